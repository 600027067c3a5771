// Pieces shared by the GPU model's files (runtime/gpu/gpu_*.cpp): owned device and pinned host memory, the
// bump allocator that lays out the saved activations, stream-ordered temporaries, and the handful of small
// kernels the model needs beside the ops of kernels/cuda/ (gpu_kernels.cu). Internal to runtime/gpu/.
#pragma once
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <utility>

#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/linear.hpp"
#include "kernels/cuda/rope.hpp"
#include "kernels/cuda/stream_scratch.hpp"
#include "kernels/linear.hpp"

namespace moerl::gpu::detail {

using cuda_detail::align256;

// One cudaMalloc'd block, freed on destruction.
class DeviceAlloc {
 public:
  DeviceAlloc() = default;
  explicit DeviceAlloc(size_t bytes) : bytes_(bytes) {
    if (bytes > 0) CUDA_CHECK(cudaMalloc(&ptr_, bytes));
  }
  ~DeviceAlloc() {
    if (ptr_) (void)cudaFree(ptr_);  // a failure here would be a sticky error, reported by the next check
  }
  DeviceAlloc(DeviceAlloc&& o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  DeviceAlloc& operator=(DeviceAlloc&& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(bytes_, o.bytes_);
    return *this;
  }
  DeviceAlloc(const DeviceAlloc&) = delete;
  DeviceAlloc& operator=(const DeviceAlloc&) = delete;

  char* get() const { return static_cast<char*>(ptr_); }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// Page-locked host memory (cudaMallocHost), so device-to-host copies into it are truly asynchronous.
template <class T> class PinnedHost {
 public:
  PinnedHost() = default;
  explicit PinnedHost(size_t n) : n_(n) {
    void* p = nullptr;
    CUDA_CHECK(cudaMallocHost(&p, std::max<size_t>(n, 1) * sizeof(T)));
    ptr_ = static_cast<T*>(p);
  }
  ~PinnedHost() {
    if (ptr_) (void)cudaFreeHost(ptr_);
  }
  PinnedHost(PinnedHost&& o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  PinnedHost& operator=(PinnedHost&& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(n_, o.n_);
    return *this;
  }
  PinnedHost(const PinnedHost&) = delete;
  PinnedHost& operator=(const PinnedHost&) = delete;

  T* get() const { return ptr_; }
  size_t size() const { return n_; }

 private:
  T* ptr_ = nullptr;
  size_t n_ = 0;
};

// Lays arrays out one after another in one allocation, each 256-byte aligned. Run twice with the same calls:
// first without a base (pointers are null, used() is the size to allocate), then on the allocation.
class Slab {
 public:
  explicit Slab(char* base = nullptr) : base_(base) {}
  template <class T> T* take(int64_t n) {
    const size_t offset = used_;
    used_ += align256(static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T));
    return base_ ? reinterpret_cast<T*>(base_ + offset) : nullptr;
  }
  size_t used() const { return used_; }

 private:
  char* base_;
  size_t used_ = 0;
};

// What every block's forward and backward run with.
struct Run {
  cudaStream_t stream = nullptr;
  cuda::LinearContext* linear = nullptr;
  Precision precision = Precision::FP32;  // of the linear layers (the router stays FP32 regardless)
  bool poison = false;                    // fill every temporary with NaN before use (tests)
};

// A temporary array of n elements from the stream-ordered pool, returned to it (in stream order) when the
// object goes out of scope. NaN-filled (all bits set) when the run asks for poison. 256-byte aligned whatever
// the pool gives: cuBLASLt picks its kernels by the operands' alignment, so a step must see the same alignment
// every time to give the same bits.
template <class T> class Temp {
 public:
  Temp(int64_t n, const Run& run)
      : scratch_(static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T) + 256, run.stream) {
    const uintptr_t raw = reinterpret_cast<uintptr_t>(scratch_.as<char>());
    ptr_ = reinterpret_cast<T*>((raw + 255) / 256 * 256);
    if (run.poison && n > 0) CUDA_CHECK(cudaMemsetAsync(ptr_, 0xFF, static_cast<size_t>(n) * sizeof(T), run.stream));
  }
  T* get() const { return ptr_; }

 private:
  cuda_detail::StreamScratch scratch_;
  T* ptr_ = nullptr;
};

// ---- Small kernels (gpu_kernels.cu) ----

// y[i] += x[i] for i < n (one FP32 add each, as the CPU's add_into).
void add_inplace(float* y, const float* x, int64_t n, cudaStream_t stream);

// MLA's per-head keys and values from the kv_b_proj output and the shared rope key:
//   kv [T, H, dn + dv] (per head [k_nope | v]); ckv [T, kv_lora + dr], its last dr columns the rotated k_rope
//   -> k [T, H, dn + dr] = [k_nope | k_rope], v [T, H, dv] (both overwritten).
void mla_assemble_kv(const float* kv, const float* ckv, float* k, float* v, int64_t tokens, int64_t heads, int64_t dn,
                     int64_t dv, int64_t dr, int64_t kv_lora, cudaStream_t stream);

// The transpose of mla_assemble_kv: dk [T, H, dn + dr], dv [T, H, dv] -> d_kv [T, H, dn + dv] (overwritten) and the
// last dr columns of d_ckv [T, kv_lora + dr] = Σ_h dk[t, h, dn:] in head order (overwritten; the first kv_lora
// columns are left alone).
void mla_split_dkv(const float* dk, const float* dv, float* d_kv, float* d_ckv, int64_t tokens, int64_t heads,
                   int64_t dn, int64_t dv_dim, int64_t dr, int64_t kv_lora, cudaStream_t stream);
// mla_split_dkv's second half alone, for the attention backward that wrote d_kv itself: the last dr columns of d_ckv
// [T, kv_lora + dr] = Σ_h dk_rope[t, h, :] (dk_rope [T, H, dr]) in head order (the same bits). With `rope` (tokens
// packed in sequences of seq), the sums are rotated back as they are stored: RoPE's backward on the rope key
// (interleaved pairs, the bits of cuda::rope_backward on them).
void mla_sum_rope_dk(const float* dk_rope, float* d_ckv, int64_t tokens, int64_t heads, int64_t dr, int64_t kv_lora,
                     cudaStream_t stream, const cuda::RopeTables* rope = nullptr, int64_t seq = 0);

}  // namespace moerl::gpu::detail
