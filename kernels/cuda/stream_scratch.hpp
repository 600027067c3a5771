// Temporary device memory ordered on a stream (cudaMallocAsync / cudaFreeAsync from the device's default pool):
// the kernels of one call share it, and it goes back to the pool when the last of them is done, without a
// device-wide synchronization. Capturable in a CUDA graph. For .cu files and host .cpp files.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>

#include "kernels/cuda/cuda_check.hpp"

namespace moerl::cuda_detail {

class StreamScratch {
 public:
  StreamScratch(size_t bytes, cudaStream_t stream) : stream_(stream) {
    CUDA_CHECK(cudaMallocAsync(&ptr_, bytes > 0 ? bytes : 1, stream));
  }
  // On the normal path release() has run and checked the free; here only an exception unwinds, and a second
  // error would hide the first, so the result is ignored.
  ~StreamScratch() {
    if (ptr_) (void)cudaFreeAsync(ptr_, stream_);
  }
  StreamScratch(const StreamScratch&) = delete;
  StreamScratch& operator=(const StreamScratch&) = delete;

  template <class T> T* as(size_t byte_offset = 0) const {
    return reinterpret_cast<T*>(static_cast<char*>(ptr_) + byte_offset);
  }
  void release() {
    void* p = ptr_;
    ptr_ = nullptr;
    CUDA_CHECK(cudaFreeAsync(p, stream_));
  }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
};

// Rounds a byte count up to a multiple of 256 (cudaMalloc's alignment), to place several arrays in one scratch.
constexpr size_t align256(size_t bytes) { return (bytes + 255) / 256 * 256; }

}  // namespace moerl::cuda_detail
