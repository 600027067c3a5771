// Helpers of the MoE GPU tests (moe_routing_gpu.cpp, moe_permute_gpu.cpp, moe_experts_gpu.cpp): the run's seed,
// device buffers, random values, CUDA-event timing and a fixture that skips without a GPU.
#pragma once
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <limits>
#include <random>
#include <vector>

#include "kernels/cuda/cuda_check.hpp"
#include "runtime/error.hpp"

namespace moerl::moe_gpu_test {

// One fresh seed per run of the binary; MOERL_TEST_SEED=<n> repeats a run.
inline uint64_t run_seed() {
  static const uint64_t seed = []() -> uint64_t {
    if (const char* env = std::getenv("MOERL_TEST_SEED")) return std::strtoull(env, nullptr, 10);
    std::random_device rd;
    return (uint64_t{rd()} << 32) | rd();
  }();
  return seed;
}

// A device buffer of n elements (at least one, so the pointer is never null).
template <class T> class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t n) : n_(n) {
    void* p = nullptr;
    CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T)));
    p_ = static_cast<T*>(p);
  }
  explicit DeviceBuffer(const std::vector<T>& v) : DeviceBuffer(v.size()) { upload(v); }
  ~DeviceBuffer() { cudaFree(p_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  T* get() const { return p_; }
  void upload(const std::vector<T>& v) {
    require(v.size() <= n_, "DeviceBuffer::upload: more elements than the buffer holds");
    CUDA_CHECK(cudaMemcpy(p_, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() const {  // synchronizes with the legacy default stream
    std::vector<T> v(n_);
    CUDA_CHECK(cudaMemcpy(v.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost));
    return v;
  }
  void poison() { CUDA_CHECK(cudaMemset(p_, 0xFF, n_ * sizeof(T))); }  // NaN as float, -1 as integer

 private:
  T* p_ = nullptr;
  size_t n_;
};

// ‖a − b‖₂ / ‖b‖₂ over n values in double; non-finite -> infinity (fails any bound); both zero -> 0 (an expert
// with no tokens).
inline double rel_l2(const float* a, const float* b, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(a[i]) - b[i];
    num += d * d;
    den += static_cast<double>(b[i]) * b[i];
  }
  if (!std::isfinite(num)) return std::numeric_limits<double>::infinity();
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}
inline double rel_l2(const std::vector<float>& got, const std::vector<float>& ref) {
  return rel_l2(got.data(), ref.data(), ref.size());
}

inline std::vector<float> normal_values(size_t n, float stddev, std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.0f, stddev);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

// Median milliseconds of one call of fn over 10 timed runs after 3 warm-ups (CUDA events, default stream).
inline double median_ms(const std::function<void()>& fn) {
  cudaEvent_t start, stop;
  CUDA_CHECK(cudaEventCreate(&start));
  CUDA_CHECK(cudaEventCreate(&stop));
  for (int i = 0; i < 3; ++i) fn();
  std::vector<float> ms(10);
  for (float& m : ms) {
    CUDA_CHECK(cudaEventRecord(start));
    fn();
    CUDA_CHECK(cudaEventRecord(stop));
    CUDA_CHECK(cudaEventSynchronize(stop));
    CUDA_CHECK(cudaEventElapsedTime(&m, start, stop));
  }
  CUDA_CHECK(cudaEventDestroy(start));
  CUDA_CHECK(cudaEventDestroy(stop));
  std::sort(ms.begin(), ms.end());
  return (ms[4] + ms[5]) / 2;
}

// Skips without a CUDA device; prints the seed once per binary.
class GpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) GTEST_SKIP() << "no CUDA device";
    static bool printed = false;
    if (!printed)
      std::printf("moe gpu tests: seed %llu (MOERL_TEST_SEED=%llu repeats this run)\n",
                  static_cast<unsigned long long>(run_seed()), static_cast<unsigned long long>(run_seed()));
    printed = true;
  }
};

}  // namespace moerl::moe_gpu_test
