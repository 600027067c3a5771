// FP8 E4M3 quantization on the GPU (kernels/cuda/fp8_quantize.cu): the same functions as
// fp8::cpu::quantize_* (kernels/fp8.hpp), bit for bit — same tiles, same scale
// max(amax, 1e-4) / 448 in FP32, same true division x / scale, same saturating round-to-nearest-even
// conversion (the hardware's cvt.rn.satfinite.e4m3x2.f32), same zero-padding of partial tiles, NaN ignored
// by amax. Codes and scales come out in the CPU layout; fp8::cuda::scales_to_cublaslt
// (kernels/fp8_gemm.hpp) converts scales for the GEMM, or the 1x128 functions write that layout (ScaleLayout).
//
// All pointers are device memory; x is read-only, the outputs are fully overwritten. Calls are
// asynchronous on `stream`. Any rows, cols >= 0 (nothing is launched for an empty matrix); aligned
// inputs (x 16-byte aligned, outputs 4-byte aligned, the contiguous dimension a multiple of 4 — as
// cudaMalloc'd buffers of such shapes are) take vectorized loads and stores, others a scalar path.
// Throws moerl::Error on bad arguments (negative sizes, null pointers) and on a launch failure.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/fp8.hpp"

namespace moerl::fp8::cuda {

// Where the 1x128 functions put their scales: the CPU's layout (as given with each function), or the one
// cuBLASLt's VEC128 GEMM reads, which saves the caller the conversion (a launch) before the GEMM: [tiles(cols),
// rows] for quantize_1x128 and [tiles(rows), cols] for the transposed (fp8::cuda::scales_to_cublaslt of the CPU
// layout); quantize_1x128_dual's rows per group of bounds, each [tiles(cols), n_g] at bounds[g] · tiles(cols)
// (as cuda::moe_grouped_vec128_scales puts them).
enum class ScaleLayout { Cpu, Cublaslt };

// x [rows, cols] -> codes [rows, cols], scales [rows, tiles(cols)]: 1x128 tiles along columns.
void quantize_1x128(const float* x, int64_t rows, int64_t cols, uint8_t* codes, float* scales,
                    cudaStream_t stream = nullptr, ScaleLayout layout = ScaleLayout::Cpu);

// w [rows, cols] -> codes [rows, cols], scales [tiles(rows), tiles(cols)]: 128x128 blocks.
void quantize_128x128(const float* w, int64_t rows, int64_t cols, uint8_t* codes, float* scales,
                      cudaStream_t stream = nullptr);

// quantize_128x128 of `batch` matrices in one launch (stacked expert weights): matrix i at w + i · rows · cols,
// its codes at codes + i · rows · cols and scales at scales + i · tiles(rows) · tiles(cols). Each matrix's bytes
// are quantize_128x128's of that matrix alone (blocks never straddle two matrices).
void quantize_128x128_batched(const float* w, int64_t batch, int64_t rows, int64_t cols, uint8_t* codes,
                              float* scales, cudaStream_t stream = nullptr);

// quantize_128x128_batched that also writes each matrix's codes transposed, codes_t [cols, rows] at
// codes_t + i · rows · cols: wᵀ's codes in 128x128 blocks (a block of wᵀ holds the elements of the block of w it
// mirrors: the same amax, scale and codes), what Dgrad multiplies by. One pass over w. Needs rows % 16 == 0 and
// codes_t 16-byte aligned; codes_t null: quantize_128x128_batched.
void quantize_128x128_with_transpose(const float* w, int64_t batch, int64_t rows, int64_t cols, uint8_t* codes,
                                     float* scales, uint8_t* codes_t, cudaStream_t stream = nullptr);

// Where quantize_128x128_placed writes matrix i's codes: at codes + i · stride (its rows `cols` apart), and its
// transposed codes at codes_t + i · t_stride with their rows t_ld apart; each 0: packed (rows · cols, rows,
// rows · cols). For a matrix that is one part of a wider one, e.g. the gate half of [w_gate; w_up] and
// [wᵀ_gate | wᵀ_up].
struct Fp8Placement {
  int64_t stride = 0, t_ld = 0, t_stride = 0;
  bool operator==(const Fp8Placement&) const = default;
};
// Where the GEMMs' copies of a weight's 128x128 block scales lie (cuBLASLt's BLK128x128 layouts, made from the CPU
// layout by kernels/cuda/linear_fp8.cu): block (bi, bj) of matrix i at sw[i · sw_stride + bi · sw_ld + bj], and as
// block (bj, bi) of the transpose at st[i · st_stride + bj · st_ld + bi]. A writer that knows them fills these
// entries as it makes the scales (the layouts' padding entries, zeros, are the preparer's); sw null: none.
struct Fp8GemmScales {
  float* sw = nullptr;
  float* st = nullptr;
  int64_t sw_ld = 0, sw_stride = 0, st_ld = 0, st_stride = 0;
  bool operator==(const Fp8GemmScales&) const = default;
};
// Where the 128x128-block quantization of `batch` matrices [rows, cols] goes: what quantize_128x128_placed takes
// besides the values (codes, block_scales in the CPU layout [batch, tiles(rows), tiles(cols)], codes_t, at), and the
// GEMMs' copies of the block scales (gemm_scales; sw null: none). A prepared weight's (cuda::Fp8WeightCopy) and the
// optimizer's that rewrites it (cuda::AdamWFp8Copy).
struct Fp8WeightCodes {
  int64_t batch = 0, rows = 0, cols = 0;
  uint8_t* codes = nullptr;
  float* block_scales = nullptr;
  uint8_t* codes_t = nullptr;
  Fp8Placement at;
  Fp8GemmScales gemm_scales;
  int64_t elements() const { return batch * rows * cols; }  // of the weight quantized
  bool operator==(const Fp8WeightCodes&) const = default;
};
// quantize_128x128_with_transpose with the codes placed as `at` says (t_ld >= rows, a multiple of 16, codes_t
// 16-byte aligned); the bytes of each matrix are the same.
void quantize_128x128_placed(const float* w, int64_t batch, int64_t rows, int64_t cols, uint8_t* codes,
                             float* scales, uint8_t* codes_t, const Fp8Placement& at, cudaStream_t stream = nullptr);

// x [rows, cols] -> codes_t [cols, rows] (= xᵀ quantized 1x128), scales_t [cols, tiles(rows)]: tiles
// along rows (tokens), what Wgrad needs.
void quantize_1x128_transposed(const float* x, int64_t rows, int64_t cols, uint8_t* codes_t, float* scales_t,
                               cudaStream_t stream = nullptr, ScaleLayout layout = ScaleLayout::Cpu);

// quantize_1x128_transposed with x's rows cut into groups (the routed experts' aligned rows): bounds [n_groups + 1]
// on the device, rising in multiples of 128 from 0 to rows (rows a multiple of 128); group g's codes are its own
// packed transpose [cols, n_g] at codes_t + bounds[g] · cols, so each is a GEMM operand as it stands. scales_t is
// quantize_1x128_transposed's (every 128-row tile lies in one group, so the tiles and scales are the same).
void quantize_1x128_transposed_grouped(const float* x, int64_t rows, int64_t cols, const int64_t* bounds,
                                       int64_t n_groups, uint8_t* codes_t, float* scales_t,
                                       cudaStream_t stream = nullptr, ScaleLayout layout = ScaleLayout::Cpu);

// quantize_1x128 and quantize_1x128_transposed_grouped of the same x in one pass over x (bounds null: one group,
// i.e. quantize_1x128_transposed): codes, scales as quantize_1x128's; codes_t, scales_t as the transposed one's.
// One kernel reading x once when rows % 128 == 0, cols % 4 == 0, x 16-byte and the codes 4-byte aligned and
// rows / 128 <= 65535 (fp8_quantize_tile.cuh); otherwise the two kernels (bounds then needs rows % 128 == 0, as
// for quantize_1x128_transposed_grouped). Where Fprop or Dgrad and Wgrad take the same activation (the routed
// experts' output gradient) this saves one read of it. ScaleLayout::Cublaslt with bounds needs the one kernel.
void quantize_1x128_dual(const float* x, int64_t rows, int64_t cols, const int64_t* bounds, int64_t n_groups,
                         uint8_t* codes, float* scales, uint8_t* codes_t, float* scales_t,
                         cudaStream_t stream = nullptr, ScaleLayout layout = ScaleLayout::Cpu);

// The two kernel shapes of the transposed quantization, giving the same bytes: Tiles64, fp8_quantize_tile.cuh's
// blocks of 128 rows x 64 columns transposed in swizzled shared memory with 16-byte code stores (what
// quantize_1x128_transposed(_grouped) use), and Cols32, blocks of 128 rows x 32 columns staged in shared memory
// with no condition on the shape (where Tiles64's fail — rows % 128, cols % 4, x 16-byte aligned — it runs
// instead). `moerl bench gpu` measures both (quant_1x128_transposed_<name>_gbps).
enum class TransposedKernel { Cols32, Tiles64 };
const char* transposed_kernel_name(TransposedKernel kernel);
// quantize_1x128_transposed with the given kernel shape.
void quantize_1x128_transposed_with(TransposedKernel kernel, const float* x, int64_t rows, int64_t cols,
                                    uint8_t* codes_t, float* scales_t, cudaStream_t stream = nullptr);
// quantize_1x128_transposed_grouped with the given kernel shape.
void quantize_1x128_transposed_grouped_with(TransposedKernel kernel, const float* x, int64_t rows, int64_t cols,
                                            const int64_t* bounds, int64_t n_groups, uint8_t* codes_t,
                                            float* scales_t, cudaStream_t stream = nullptr,
                                            ScaleLayout layout = ScaleLayout::Cpu);

}  // namespace moerl::fp8::cuda
