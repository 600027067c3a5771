// SwiGLU fused with the FP8 quantization of its output (kernels/cuda/swiglu_fp8.cu), for the routed experts' FP8
// path (kernels/cuda/moe_fp8_experts.cu): the same bytes as cuda::swiglu_forward / swiglu_backward
// (kernels/cuda/swiglu.hpp) followed by fp8::cuda::quantize_1x128 / quantize_1x128_dual (kernels/fp8_quantize.hpp),
// without the pass over memory between them. No CPU reference of their own: the GPU tests compare them with the
// unfused kernels, byte for byte.
//
// Shapes: [rows, cols] row-major with rows % 128 == 0 (aligned expert rows), cols % 4 == 0, rows / 128 <= 65535;
// FP32 pointers 16-byte aligned, codes 4-byte aligned (as cudaMalloc'd buffers of such shapes are). All pointers
// device memory, calls asynchronous on `stream`. Throws moerl::Error on other shapes, null pointers or a failed
// launch.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace moerl::cuda {

// The sizes and pointers the fused kernels take (else use the unfused ones).
bool swiglu_fp8_supported(int64_t rows, int64_t cols, const void* a, const void* b, const void* c);

// In every function below, g and u are [rows, cols] with row r at g + r · gu_ld and u + r · gu_ld (gu_ld 0: cols, a
// multiple of 4 otherwise): with gu_ld = 2 Ip and u = g + Ip they are the halves of one [rows, 2 Ip] matrix (the
// routed experts' gate and up from one GEMM). dh, h and the codes are packed [rows, cols] unless said otherwise.

// h = silu(g) · u (written, as swiglu_forward) and quantize_1x128(h): codes [rows, cols], scales
// [rows, tiles(cols)].
void swiglu_forward_quantize_1x128(const float* g, const float* u, int64_t rows, int64_t cols, int64_t gu_ld, float* h,
                                   uint8_t* codes, float* scales, cudaStream_t stream = nullptr);

// One gradient of swiglu_backward(dh, g, u) — dg when `gate`, else du (u unused then, may be null) — never
// written in FP32, quantized as fp8::cuda::quantize_1x128_dual(grad, rows, cols, bounds, n_groups, codes, scales,
// codes_t, scales_t) would.
void swiglu_backward_quantize_dual(const float* dh, const float* g, const float* u, int64_t rows, int64_t cols,
                                   int64_t gu_ld, bool gate, const int64_t* bounds, int64_t n_groups, uint8_t* codes, float* scales,
                                   uint8_t* codes_t, float* scales_t, cudaStream_t stream = nullptr);

// Where one quantization both ways goes: codes [rows, cols] and scales [rows, tiles(cols)] along features, codes_t
// and scales_t along tokens (fp8::cuda::quantize_1x128_dual's outputs).
struct Fp8Dual {
  uint8_t* codes = nullptr;
  float* scales = nullptr;
  uint8_t* codes_t = nullptr;
  float* scales_t = nullptr;
  // Row strides of codes and scales (elements); 0: packed, cols and tiles(cols). Set where the rows are one half
  // of a wider matrix: dg and du side by side as [rows, 2 · cols] for one K = 2 · cols Dgrad GEMM.
  int64_t codes_ld = 0, scales_ld = 0;
  // The scales' layouts and the rows' first scale column (fp8_quantize_tile.cuh's TileOutputs): cuBLASLt's VEC128
  // instead of the CPU's, for the rows (each group's [scales_ld or tiles(cols), n_g]) and the columns ([rows / 128,
  // cols]); scales_col0 places a half's tiles within the wider operand's.
  bool rows_lt = false, cols_lt = false;
  int64_t scales_col0 = 0;
  // swiglu_backward_quantize_dual_both only: the rows' codes also written as zeros from cols to the end of the last
  // 128-column tile (codes_ld must leave room), for a half of a [dg | du] whose halves are padded to whole tiles.
  bool zero_pad = false;
  // swiglu_backward_quantize_dual_both only (0 elsewhere): the columns' codes and scales as a view into a wider
  // activation's (TileOutputs::t_cols, t_col0), e.g. dg's and du's as [dg | du]'s; 0, 0: alone.
  int64_t t_cols = 0, t_col0 = 0;
};

// h = silu(g) · u quantized both ways (quantize_1x128_dual's outputs, tokens grouped by bounds as there) in one
// pass; h itself written too unless null.
void swiglu_forward_quantize_dual(const float* g, const float* u, int64_t rows, int64_t cols, int64_t gu_ld, float* h,
                                  const int64_t* bounds, int64_t n_groups, const Fp8Dual& out,
                                  cudaStream_t stream = nullptr);

// Both gradients of swiglu_backward(dh, g, u) in one pass: what swiglu_backward_quantize_dual gives for dg (gate)
// and for du, bit for bit, reading dh and g once instead of twice (u is needed). The rows' codes and scales at
// each Fp8Dual's row strides.
void swiglu_backward_quantize_dual_both(const float* dh, const float* g, const float* u, int64_t rows, int64_t cols,
                                        int64_t gu_ld, const int64_t* bounds, int64_t n_groups, const Fp8Dual& dg, const Fp8Dual& du,
                                        cudaStream_t stream = nullptr);

// BF16 inputs (bit patterns; the FP8 experts' g | u and dh as their GEMMs write them, MoeFp8Experts::gate_up_bf16):
// the bytes the FP32 functions above give for the inputs widened to FP32 (every BF16 value is exact in FP32). The
// forward's g and u 8-byte aligned instead of 16, h (FP32) may be null; the backward (pipelined, 16-byte copies) needs
// dh, g and u 16-byte aligned and cols and gu_ld multiples of 8.
void swiglu_forward_quantize_1x128(const uint16_t* g, const uint16_t* u, int64_t rows, int64_t cols, int64_t gu_ld,
                                   float* h, uint8_t* codes, float* scales, cudaStream_t stream = nullptr);
void swiglu_forward_quantize_dual(const uint16_t* g, const uint16_t* u, int64_t rows, int64_t cols, int64_t gu_ld,
                                  float* h, const int64_t* bounds, int64_t n_groups, const Fp8Dual& out,
                                  cudaStream_t stream = nullptr);
void swiglu_backward_quantize_dual_both(const uint16_t* dh, const uint16_t* g, const uint16_t* u, int64_t rows,
                                        int64_t cols, int64_t gu_ld, const int64_t* bounds, int64_t n_groups,
                                        const Fp8Dual& dg, const Fp8Dual& du, cudaStream_t stream = nullptr);

}  // namespace moerl::cuda
