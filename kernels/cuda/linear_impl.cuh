// Internals of the GPU linear layers shared by kernels/cuda/linear.cu (context, argument checks, FP32 and BF16)
// and kernels/cuda/linear_fp8.cu (the FP8 recipe): the context's state and the prepared weights.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <utility>
#include <vector>

#include "kernels/cuda/cublaslt_matmul.hpp"
#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/linear.hpp"
#include "kernels/cuda/stream_scratch.hpp"
#include "kernels/fp8_gemm.hpp"

namespace moerl::cuda::linear_detail {

// One cudaMalloc'd buffer (prepared weights live as long as the context, outside the stream-ordered pool).
class DeviceAllocation {
 public:
  DeviceAllocation() = default;
  explicit DeviceAllocation(size_t bytes) : bytes_(bytes) { CUDA_CHECK(cudaMalloc(&ptr_, bytes > 0 ? bytes : 1)); }
  ~DeviceAllocation() {
    if (ptr_) (void)cudaFree(ptr_);  // a destructor must not throw; a failing cudaFree leaves nothing to undo
  }
  DeviceAllocation(DeviceAllocation&& o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)), bytes_(o.bytes_) {}
  DeviceAllocation& operator=(DeviceAllocation&& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(bytes_, o.bytes_);
    return *this;
  }
  DeviceAllocation(const DeviceAllocation&) = delete;
  DeviceAllocation& operator=(const DeviceAllocation&) = delete;

  template <class T> T* as(size_t byte_offset = 0) const {
    return reinterpret_cast<T*>(static_cast<char*>(ptr_) + byte_offset);
  }
  size_t bytes() const { return ptr_ ? bytes_ : 0; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// Byte offsets of several arrays in one allocation, each starting 256-byte aligned (as cudaMalloc's base is).
struct Layout {
  size_t total = 0;
  size_t add(size_t bytes) {
    const size_t at = total;
    total += (bytes + 255) / 256 * 256;
    return at;
  }
};

// A prepared weight: its key is (device address, N, K, precision).
struct WeightKey {
  const float* w;
  int64_t n, k;
  Precision p;
  int64_t batch = 0;  // stacked FP8 copies of `batch` experts (fp8_stacked_weight); 0: one weight
  const float* second = nullptr;  // fp8_stacked_gate_up: the up weight beside w (the gate); null: w alone
  auto operator<=>(const WeightKey&) const = default;
};

struct PreparedWeight {
  uint64_t generation = 0;  // the context generation the contents were made in; 0: never filled
  DeviceAllocation memory;
  PreparedFp8Weight fp8;    // FP8: views into `memory`
  PreparedFp8Stack stack;   // stacked FP8: views into `memory`
  PreparedFp8GateUp gate_up;  // gate and up side by side: views into `memory`
  // FP8: how the codes are made from the master (LinearContext::fp8_weight_copies; none for a padded weight), and
  // how the copies' block scales (in `memory`) become the GEMMs' scales.
  std::vector<Fp8WeightCopy> copies;
  std::function<void(cudaStream_t)> finish_scales;
};

// One FP8 operand [rows, cols] (1x128 tiles along cols, scales in cuBLASLt's layout) in memory from the pool, freed
// (stream-ordered) by release() or when it goes.
class Fp8OperandMemory {
 public:
  Fp8OperandMemory(int64_t rows, int64_t cols, cudaStream_t stream)
      : scales_at_(cuda_detail::align256(static_cast<size_t>(rows * cols))),
        memory_(scales_at_ + static_cast<size_t>(fp8::cuda::cublaslt_scale_count(rows, cols, 1)) * sizeof(float),
                stream),
        operand_{codes(), scales(), rows, cols, 1} {}
  uint8_t* codes() const { return memory_.as<uint8_t>(); }
  float* scales() const { return memory_.as<float>(scales_at_); }
  const fp8::cuda::Operand& operand() const { return operand_; }
  void release() { memory_.release(); }

 private:
  size_t scales_at_;
  cuda_detail::StreamScratch memory_;
  fp8::cuda::Operand operand_;
};

}  // namespace moerl::cuda::linear_detail

namespace moerl::cuda {

struct LinearContext::Impl {
  Impl();

  int device = 0;
  cuda_detail::LtMatmul lt;         // FP32 and BF16 GEMMs
  fp8::cuda::GemmContext fp8;       // block-scaled FP8 GEMMs
  uint64_t generation = 1;          // bumped by weights_changed()
  std::map<linear_detail::WeightKey, linear_detail::PreparedWeight> weights;  // node-based: entries never move

  // Throws moerl::Error naming `fn` unless this context's device is current.
  void check_device(const char* fn) const;
  // The entry of (w, N, K, p) with `bytes` of device memory, allocated on first use. Its generation says whether
  // the contents are current.
  linear_detail::PreparedWeight& entry(const float* w, int64_t N, int64_t K, Precision p, size_t bytes,
                                       int64_t batch = 0, const float* second = nullptr);
  // The BF16 copy of w [N, K], refreshed on `stream` when stale.
  const uint16_t* bf16_weight(const float* w, int64_t N, int64_t K, cudaStream_t stream);
};

// x [M, K]'s Wgrad operand xᵀ [K, M] (1x128 along M).
struct SavedInput::Impl {
  Impl(const float* x_, int64_t M_, int64_t K_, cudaStream_t stream) : x(x_), M(M_), K(K_), tokens(K_, M_, stream) {}
  const float* x;
  int64_t M, K;
  linear_detail::Fp8OperandMemory tokens;
};

}  // namespace moerl::cuda

namespace moerl::cuda::linear_detail {

// The FP8 recipe (linear_fp8.cu). Sizes > 0, pointers checked by the callers; outputs as in linear.hpp.
const PreparedFp8Weight& fp8_weight(LinearContext::Impl& ctx, const float* w, int64_t N, int64_t K,
                                    cudaStream_t stream);
// The stacked copies of prepared_fp8_stacked_weight (N, K multiples of 16, >= 128; checked by the caller); expert
// e's weight at w + e · w_stride (0: N · K, packed).
const PreparedFp8Stack& fp8_stacked_weight(LinearContext::Impl& ctx, const float* w, int64_t experts, int64_t N,
                                           int64_t K, cudaStream_t stream, int64_t w_stride = 0);
// The routed experts' gate and up weights [experts, I, H] as one Fprop and one Dgrad operand per expert,
// [w_gate; w_up] [2 Ip, H] and [wᵀ_gate | wᵀ_up] [H, 2 Ip] (Ip = I rounded up to 128, each half's rows or columns
// past I zero): g | u = x · [w_gate; w_up]ᵀ is one GEMM with N = 2 Ip and dx = [dg | du] · [w_gate; w_up] one with
// K = 2 Ip, instead of two each (the second Dgrad reading and rewriting dx). Quantized straight into place
// (fp8::cuda::quantize_128x128_placed), so each half's bytes are fp8_stacked_weight's of that weight. Expert e's
// gate and up at gate + e · w_stride and up + e · w_stride (0: I · H).
const PreparedFp8GateUp& fp8_stacked_gate_up(LinearContext::Impl& ctx, const float* gate, const float* up,
                                             int64_t experts, int64_t I, int64_t H, cudaStream_t stream,
                                             int64_t w_stride = 0);
// keep (empty on entry): x's Wgrad operand kept for the backward where x needs no padding (SavedInput).
void fp8_forward(LinearContext::Impl& ctx, const float* x, const float* w, float* y, int64_t M, int64_t N, int64_t K,
                 cudaStream_t stream, SavedInput* keep = nullptr);
// fp8_forward of each output, x quantized once.
void fp8_forward_shared(LinearContext::Impl& ctx, const float* x, const std::vector<LinearOutput>& outs, int64_t M,
                        int64_t K, cudaStream_t stream, SavedInput* keep = nullptr);
// fp8_backward of each gradient in turn (dx written by the first unless accumulate_dx, added by the rest), xᵀ
// quantized once (or taken from saved, when it holds x's). Every dy, w and dw set, M, K and every N > 0.
void fp8_backward_shared(LinearContext::Impl& ctx, const float* x, const std::vector<LinearGradient>& grads, float* dx,
                         int64_t M, int64_t K, bool accumulate_dx, cudaStream_t stream,
                         const SavedInput* saved = nullptr);
// Dgrad into dx (unless null; added to it with accumulate_dx) and Wgrad accumulated into dw (unless null), xᵀ from
// saved when it holds x's.
void fp8_backward(LinearContext::Impl& ctx, const float* dy, const float* x, const float* w, float* dx, float* dw,
                  int64_t M, int64_t N, int64_t K, bool accumulate_dx, bool overwrite_dw, cudaStream_t stream,
                  const SavedInput* saved = nullptr);

}  // namespace moerl::cuda::linear_detail
