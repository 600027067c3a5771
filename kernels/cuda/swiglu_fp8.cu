// SwiGLU fused with FP8 quantization (kernels/cuda/swiglu_fp8.hpp): the 128 x 128 block kernels of
// kernels/cuda/fp8_quantize_tile.cuh (h) and the pipelined kernel of fp8_quantize_pipelined.cuh (dg and du together)
// with SwiGLU's arithmetic (kernels/cuda/swiglu_math.cuh) as their source. On the H200 at the MoE benchmark's shape
// (98304 x 1408) dg and du took 0.98 ms pipelined against 1.31 with the block kernel holding both in registers
// (one block per SM), while h took 0.63 against 0.58 (bench/results/2026-11-29-gpu-run1-h200-*).
// Per routed-expert layer this saves, forward, the re-read of h [rows, I] before its quantization and, backward,
// writing dg and du [rows, I] in FP32 and reading them four times (rows and tokens quantization of each): the two
// gradients are each computed where they are quantized, from dh, g (and u for dg).
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/fp8_quantize_pipelined.cuh"
#include "kernels/cuda/fp8_quantize_tile.cuh"
#include "kernels/cuda/swiglu_fp8.hpp"
#include "kernels/cuda/swiglu_math.cuh"
#include "runtime/error.hpp"

namespace moerl::cuda {
namespace {

using fp8::kTile;
using fp8::cuda::quant_detail::launch_quantize_pipelined;
using fp8::cuda::quant_detail::launch_quantize_tiles;
using fp8::cuda::quant_detail::PipeOutputs;
using fp8::cuda::quant_detail::TileOutputs;
using swiglu_detail::silu_grads;
using swiglu_detail::silu_grads4;
using swiglu_detail::silu_times;

// 4 values as loaded (FP32, or BF16 bit patterns) and widened to FP32.
template <class T> using Vec4 = std::conditional_t<sizeof(T) == 2, uint2, float4>;
template <class T> __device__ __forceinline__ Vec4<T> ld4(const T* p) { return *reinterpret_cast<const Vec4<T>*>(p); }
__device__ __forceinline__ float4 widen(const float4& v) { return v; }
__device__ __forceinline__ float4 widen(const uint2& b) {
  return make_float4(__uint_as_float(b.x << 16), __uint_as_float(b.x & 0xFFFF0000u), __uint_as_float(b.y << 16),
                     __uint_as_float(b.y & 0xFFFF0000u));
}

// Sources of the tile kernel (fp8_quantize_tile.cuh: load, then value).
// h = silu(g) · u, written to h as it is produced. G: float, or uint16_t for g and u in BF16.
template <class G>
struct ForwardSource {
  const G *g, *u;
  float* h;
  int64_t cols, gu_ld;
  static constexpr bool kLoadAhead = sizeof(G) == 2;  // FP32 g and u: 16 float4s, no room beside the values
  struct Raw {
    Vec4<G> g, u;
  };
  __device__ __forceinline__ Raw load(int64_t r, int64_t c) const {
    const int64_t j = r * gu_ld + c;
    return {ld4(g + j), ld4(u + j)};
  }
  __device__ __forceinline__ float4 value(const Raw& raw, int64_t r, int64_t c, bool in) const {
    if (!in) return fp8::cuda::quant_detail::zero4();
    const float4 gv = widen(raw.g), uv = widen(raw.u);
    const float4 hv = make_float4(silu_times(gv.x, uv.x), silu_times(gv.y, uv.y), silu_times(gv.z, uv.z),
                                  silu_times(gv.w, uv.w));
    if (h != nullptr) *reinterpret_cast<float4*>(h + r * cols + c) = hv;  // kept for the backward: a normal store
    return hv;
  }
};

// dg (kGate) or du of swiglu_backward, from FP32 dh, g and u.
template <bool kGate>
struct BackwardSource {
  const float *dh, *g, *u;
  int64_t cols, gu_ld;
  static constexpr bool kLoadAhead = false;  // 24 float4s would not fit beside the values
  struct Raw {
    float4 dh, g, u;
  };
  __device__ __forceinline__ float grad(float dhv, float gv, float uv) const {
    float dg, du;
    silu_grads(dhv, gv, uv, dg, du);
    return kGate ? dg : du;
  }
  __device__ __forceinline__ Raw load(int64_t r, int64_t c) const {
    const int64_t i = r * cols + c, j = r * gu_ld + c;
    return {ld4(dh + i), ld4(g + j), kGate ? ld4(u + j) : fp8::cuda::quant_detail::zero4()};
  }
  __device__ __forceinline__ float4 value(const Raw& raw, int64_t, int64_t, bool in) const {
    if (!in) return fp8::cuda::quant_detail::zero4();
    return make_float4(grad(raw.dh.x, raw.g.x, raw.u.x), grad(raw.dh.y, raw.g.y, raw.u.y),
                       grad(raw.dh.z, raw.g.z, raw.u.z), grad(raw.dh.w, raw.g.w, raw.u.w));
  }
};

// dg and du from dh, g and u: the pipelined kernel's source (fp8_quantize_pipelined.cuh), for both gradients
// quantized both ways in one pass. T: float, or uint16_t for all three in BF16.
template <class T>
struct BackwardPairRows {
  static constexpr int kInputs = 3, kOutputs = 2;
  static constexpr uint32_t kBf16Inputs = sizeof(T) == 2 ? 7u : 0u;
  const T *dh, *g, *u;
  int64_t cols, gu_ld;
  __device__ __forceinline__ const void* row(int64_t r, int i) const {
    return i == 0 ? dh + r * cols : (i == 1 ? g : u) + r * gu_ld;
  }
  __device__ __forceinline__ int64_t row_bytes(int i) const {
    return static_cast<int64_t>(sizeof(T)) * (i == 0 ? cols : gu_ld);
  }
  __device__ __forceinline__ void apply4(const float (&in)[3][4], float (&out)[2][4]) const {
    silu_grads4(in[0], in[1], in[2], out[0], out[1]);
  }
};

bool aligned(const void* p, uintptr_t n) { return reinterpret_cast<uintptr_t>(p) % n == 0; }

// The shapes the fused kernels take, with inputs aligned to `alignment` bytes (4 values a load: 16 for FP32, 8 for
// BF16).
bool supported_aligned(int64_t rows, int64_t cols, const void* a, const void* b, const void* c, uintptr_t alignment) {
  return rows >= 0 && cols >= 0 && rows % kTile == 0 && rows / kTile <= 65535 && cols % 4 == 0 &&
         fp8::tiles(cols) <= INT32_MAX && a != nullptr && b != nullptr && aligned(a, alignment) &&
         aligned(b, alignment) && (c == nullptr || aligned(c, alignment));
}

// Fp8Dual's row strides: packed (0), or at least a row and keeping the codes' 4-byte stores aligned.
bool row_strides_ok(const Fp8Dual& d, int64_t cols) {
  return (d.codes_ld == 0 || (d.codes_ld >= cols && d.codes_ld % 4 == 0)) &&
         (d.scales_ld == 0 ? d.scales_col0 == 0 : d.scales_col0 >= 0 && d.scales_col0 + fp8::tiles(cols) <= d.scales_ld);
}

int64_t gu_or(int64_t gu_ld, int64_t cols) { return gu_ld != 0 ? gu_ld : cols; }

// g and u (a, b) with row stride gu_ld, c packed (or null); inputs FP32 (16-byte aligned) or BF16 (8-byte).
void check(const char* fn, int64_t rows, int64_t cols, int64_t gu_ld, const void* a, const void* b, const void* c,
           bool outputs_set, bool bf16 = false) {
  require(supported_aligned(rows, cols, a, b, c, bf16 ? 8 : 16) && outputs_set &&
              (gu_ld == 0 || (gu_ld >= cols && gu_ld % 4 == 0)),
          [&] {
            return std::string("cuda::") + fn +
                   ": needs rows a multiple of 128 (at most 128 x 65535), cols a multiple of 4, " +
                   (bf16 ? "8" : "16") +
                   "-byte aligned inputs, g and u's row stride 0 or a multiple of 4 of at least " +
                   "cols, and set outputs, got " + std::to_string(rows) + " x " + std::to_string(cols) + ", stride " +
                   std::to_string(gu_ld);
          });
}

}  // namespace

bool swiglu_fp8_supported(int64_t rows, int64_t cols, const void* a, const void* b, const void* c) {
  return supported_aligned(rows, cols, a, b, c, 16);
}

void swiglu_forward_quantize_1x128(const float* g, const float* u, int64_t rows, int64_t cols, int64_t gu_ld, float* h,
                                   uint8_t* codes, float* scales, cudaStream_t stream) {
  check("swiglu_forward_quantize_1x128", rows, cols, gu_ld, g, u, h, h && codes && scales && aligned(codes, 4));
  TileOutputs o;
  o.rows = rows, o.cols = cols, o.codes = codes, o.scales = scales;
  launch_quantize_tiles<true, false>(ForwardSource<float>{g, u, h, cols, gu_or(gu_ld, cols)}, o, stream);
}

void swiglu_backward_quantize_dual(const float* dh, const float* g, const float* u, int64_t rows, int64_t cols,
                                   int64_t gu_ld, bool gate, const int64_t* bounds, int64_t n_groups, uint8_t* codes, float* scales,
                                   uint8_t* codes_t, float* scales_t, cudaStream_t stream) {
  check("swiglu_backward_quantize_dual", rows, cols, gu_ld, g, dh, gate ? u : nullptr,
        (!gate || u) && codes && scales && codes_t && scales_t && aligned(codes, 4) && aligned(codes_t, 4) &&
            (bounds == nullptr || n_groups > 0));
  TileOutputs o;
  o.rows = rows, o.cols = cols, o.codes = codes, o.scales = scales, o.codes_t = codes_t, o.scales_t = scales_t;
  o.bounds = bounds, o.n_groups = n_groups;
  if (gate)
    launch_quantize_tiles<true, true>(BackwardSource<true>{dh, g, u, cols, gu_or(gu_ld, cols)}, o, stream);
  else
    launch_quantize_tiles<true, true>(BackwardSource<false>{dh, g, nullptr, cols, gu_or(gu_ld, cols)}, o, stream);
}

namespace {

template <class T>
void backward_dual_both(const char* fn, const T* dh, const T* g, const T* u, int64_t rows, int64_t cols, int64_t gu_ld,
                        const int64_t* bounds, int64_t n_groups, const Fp8Dual& dg, const Fp8Dual& du,
                        cudaStream_t stream) {
  auto set = [&](const Fp8Dual& d) {
    return row_strides_ok(d, cols) && d.codes && d.scales && d.codes_t && d.scales_t && aligned(d.codes, 4) &&
           aligned(d.codes_t, 4) && (!d.zero_pad || d.codes_ld >= fp8::tiles(cols) * kTile) &&
           (d.t_cols == 0 ? d.t_col0 == 0 : d.t_col0 >= 0 && d.t_col0 + cols <= d.t_cols);
  };
  check(fn, rows, cols, gu_ld, g, u, dh, u && set(dg) && set(du) && (bounds == nullptr || n_groups > 0),
        sizeof(T) == 2);
  if constexpr (sizeof(T) == 2)  // the pipelined kernel copies 16 bytes (8 values) at a time
    require(cols % 8 == 0 && gu_ld % 8 == 0 && aligned(dh, 16) && aligned(g, 16) && aligned(u, 16), [&] {
      return std::string("cuda::") + fn + ": BF16 inputs need cols and g, u's row stride multiples of 8 and 16-byte " +
             "aligned dh, g and u, got cols " + std::to_string(cols) + ", stride " + std::to_string(gu_ld);
    });
  TileOutputs a;
  a.rows = rows, a.cols = cols, a.bounds = bounds, a.n_groups = n_groups;
  TileOutputs b = a;
  a.codes = dg.codes, a.scales = dg.scales, a.codes_t = dg.codes_t, a.scales_t = dg.scales_t;
  b.codes = du.codes, b.scales = du.scales, b.codes_t = du.codes_t, b.scales_t = du.scales_t;
  for (auto [o, d] : {std::pair{&a, &dg}, std::pair{&b, &du}}) {
    o->codes_ld = d->codes_ld, o->scales_ld = d->scales_ld;
    o->rows_lt = d->rows_lt, o->cols_lt = d->cols_lt, o->scales_col0 = d->scales_col0, o->zero_pad = d->zero_pad;
    o->t_cols = d->t_cols, o->t_col0 = d->t_col0;
  }
  launch_quantize_pipelined(BackwardPairRows<T>{dh, g, u, cols, gu_or(gu_ld, cols)}, PipeOutputs<2>{{a, b}}, stream);
}

template <class G>
void forward_dual(const char* fn, const G* g, const G* u, int64_t rows, int64_t cols, int64_t gu_ld, float* h,
                  const int64_t* bounds, int64_t n_groups, const Fp8Dual& out, cudaStream_t stream) {
  check(fn, rows, cols, gu_ld, g, u, h,
        row_strides_ok(out, cols) && out.codes && out.scales && out.codes_t && out.scales_t &&
            aligned(out.codes, 4) && aligned(out.codes_t, 4) && (bounds == nullptr || n_groups > 0) &&
            out.t_cols == 0 && out.t_col0 == 0,
        sizeof(G) == 2);
  TileOutputs o;
  o.rows = rows, o.cols = cols, o.codes = out.codes, o.scales = out.scales, o.codes_t = out.codes_t,
  o.scales_t = out.scales_t, o.bounds = bounds, o.n_groups = n_groups;
  o.codes_ld = out.codes_ld, o.scales_ld = out.scales_ld;
  o.rows_lt = out.rows_lt, o.cols_lt = out.cols_lt, o.scales_col0 = out.scales_col0;
  launch_quantize_tiles<true, true>(ForwardSource<G>{g, u, h, cols, gu_or(gu_ld, cols)}, o, stream);
}

}  // namespace

void swiglu_backward_quantize_dual_both(const float* dh, const float* g, const float* u, int64_t rows, int64_t cols,
                                        int64_t gu_ld, const int64_t* bounds, int64_t n_groups, const Fp8Dual& dg,
                                        const Fp8Dual& du, cudaStream_t stream) {
  backward_dual_both("swiglu_backward_quantize_dual_both", dh, g, u, rows, cols, gu_ld, bounds, n_groups, dg, du,
                     stream);
}

void swiglu_backward_quantize_dual_both(const uint16_t* dh, const uint16_t* g, const uint16_t* u, int64_t rows,
                                        int64_t cols, int64_t gu_ld, const int64_t* bounds, int64_t n_groups,
                                        const Fp8Dual& dg, const Fp8Dual& du, cudaStream_t stream) {
  backward_dual_both("swiglu_backward_quantize_dual_both (BF16)", dh, g, u, rows, cols, gu_ld, bounds, n_groups, dg,
                     du, stream);
}

void swiglu_forward_quantize_dual(const float* g, const float* u, int64_t rows, int64_t cols, int64_t gu_ld, float* h,
                                  const int64_t* bounds, int64_t n_groups, const Fp8Dual& out, cudaStream_t stream) {
  forward_dual("swiglu_forward_quantize_dual", g, u, rows, cols, gu_ld, h, bounds, n_groups, out, stream);
}

void swiglu_forward_quantize_dual(const uint16_t* g, const uint16_t* u, int64_t rows, int64_t cols, int64_t gu_ld,
                                  float* h, const int64_t* bounds, int64_t n_groups, const Fp8Dual& out,
                                  cudaStream_t stream) {
  forward_dual("swiglu_forward_quantize_dual (BF16)", g, u, rows, cols, gu_ld, h, bounds, n_groups, out, stream);
}

void swiglu_forward_quantize_1x128(const uint16_t* g, const uint16_t* u, int64_t rows, int64_t cols, int64_t gu_ld,
                                   float* h, uint8_t* codes, float* scales, cudaStream_t stream) {
  check("swiglu_forward_quantize_1x128 (BF16)", rows, cols, gu_ld, g, u, h, codes && scales && aligned(codes, 4),
        true);
  TileOutputs o;
  o.rows = rows, o.cols = cols, o.codes = codes, o.scales = scales;
  launch_quantize_tiles<true, false>(ForwardSource<uint16_t>{g, u, h, cols, gu_or(gu_ld, cols)}, o, stream);
}

}  // namespace moerl::cuda
