// Pieces shared by the CUDA versions of the model's non-GEMM ops (rmsnorm, rope, swiglu, embedding,
// cross_entropy, adamw .cu files): sums in a fixed order, vector loads, launch sizes and stream-ordered scratch
// memory. Include from .cu files only.
//
// Determinism: every reduction here adds in an order fixed by the problem size alone (never by the number of
// SMs, never through float atomics), so a result has the same bits on every run and every GPU.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/cuda_check.hpp"

namespace moerl::cuda::ops_detail {

constexpr int kWarp = 32;
constexpr int kMaxWarps = 32;  // 1024 threads

// kernels/half.hpp's BF16 conversions on the device. bf16_from_float: round to nearest even, NaN kept quiet NaN;
// float_from_bf16: exact.
__device__ __forceinline__ uint16_t bf16_from_float(float x) {
  uint32_t u = __float_as_uint(x);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
__device__ __forceinline__ float float_from_bf16(uint16_t b) {
  return __uint_as_float(static_cast<uint32_t>(b) << 16);
}

// Butterfly sum over the warp. Lanes i and i ^ o add the same two values (a + b == b + a in IEEE), so every
// lane ends with the same bits.
template <class T> __device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32), the same bits in every thread: warp sums, then the warps'
// sums in warp order. `scratch` holds kMaxWarps values; the trailing barrier lets the caller reuse it.
template <class T> __device__ __forceinline__ T block_sum(T v, T* scratch) {
  v = warp_sum(v);
  if (threadIdx.x % kWarp == 0) scratch[threadIdx.x / kWarp] = v;
  __syncthreads();
  T total = scratch[0];
  for (int w = 1; w < static_cast<int>(blockDim.x / kWarp); ++w) total += scratch[w];
  __syncthreads();
  return total;
}

// V consecutive floats of group `group` (elements group*V .. group*V + V - 1); V = 4 needs 16-byte alignment.
template <int V> __device__ __forceinline__ void load(const float* p, int64_t group, float (&v)[V]) {
  static_assert(V == 1 || V == 4, "vector width 1 or 4");
  if constexpr (V == 4) {
    const float4 f = reinterpret_cast<const float4*>(p)[group];
    v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
  } else {
    v[0] = p[group];
  }
}

template <int V> __device__ __forceinline__ void store(float* p, int64_t group, const float (&v)[V]) {
  static_assert(V == 1 || V == 4, "vector width 1 or 4");
  if constexpr (V == 4) {
    reinterpret_cast<float4*>(p)[group] = make_float4(v[0], v[1], v[2], v[3]);
  } else {
    p[group] = v[0];
  }
}

inline bool aligned(const void* p, uintptr_t n) { return reinterpret_cast<uintptr_t>(p) % n == 0; }

// Blocks for a grid-stride loop over `items` with `threads` per block: enough to fill an H200 many times over,
// capped so the grid size fits the launch limit.
inline unsigned grid_stride_blocks(int64_t items, int threads) {
  constexpr int64_t kMaxBlocks = int64_t{1} << 16;
  const int64_t blocks = (items + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 1 ? 1 : blocks > kMaxBlocks ? kMaxBlocks : blocks);
}

// Device scratch memory ordered on `stream` (cudaMallocAsync / cudaFreeAsync from the device's default pool:
// cheap after the first call, usable in graph capture). Freed when it goes out of scope, also when a later
// check throws.
class StreamScratch {
 public:
  StreamScratch(size_t bytes, cudaStream_t stream) : stream_(stream) {
    if (bytes > 0) CUDA_CHECK(cudaMallocAsync(&p_, bytes, stream));
  }
  ~StreamScratch() {
    if (p_) cudaFreeAsync(p_, stream_);  // an error here would already be sticky: reported by the next check
  }
  StreamScratch(const StreamScratch&) = delete;
  StreamScratch& operator=(const StreamScratch&) = delete;
  // A typed pointer `byte_offset` bytes into the block (offsets the caller keeps aligned).
  template <class T> T* at(size_t byte_offset = 0) const {
    return reinterpret_cast<T*>(static_cast<char*>(p_) + byte_offset);
  }

 private:
  cudaStream_t stream_;
  void* p_ = nullptr;
};

// `bytes` rounded up to a multiple of 256, to place several arrays in one scratch block.
constexpr size_t align256(size_t bytes) { return (bytes + 255) / 256 * 256; }

}  // namespace moerl::cuda::ops_detail
