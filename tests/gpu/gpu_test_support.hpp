// What every GPU test file needs: the run's seed, device buffers and CUDA-event timing. Each run of moerl_gpu_tests draws fresh random
// inputs from one seed, printed by the tests; MOERL_TEST_SEED=<n> repeats a run.
#pragma once
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/cuda_check.hpp"
#include "runtime/error.hpp"

namespace moerl::gpu_test {

// One fresh seed per run of the binary; MOERL_TEST_SEED=<n> repeats a run.
inline uint64_t run_seed() {
  static const uint64_t seed = []() -> uint64_t {
    if (const char* env = std::getenv("MOERL_TEST_SEED")) return std::strtoull(env, nullptr, 10);
    std::random_device rd;
    return (uint64_t{rd()} << 32) | rd();
  }();
  return seed;
}

// "seed N (MOERL_TEST_SEED=N repeats this run)", for the tests' first line and their traces.
inline std::string seed_note() {
  const std::string n = std::to_string(run_seed());
  return "seed " + n + " (MOERL_TEST_SEED=" + n + " repeats this run)";
}

// n elements of device memory, freed with the buffer (at least one is allocated, so the pointer is never null).
// Copies go through the legacy default stream, which waits for the work of blocking streams.
template <class T> class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t n) : n_(n) {
    void* p = nullptr;
    CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T)));
    p_ = static_cast<T*>(p);
  }
  // h.size() + offset elements, h copied in from element `offset` on.
  explicit DeviceBuffer(const std::vector<T>& h, size_t offset = 0) : DeviceBuffer(h.size() + offset) {
    upload(h, offset);
  }
  ~DeviceBuffer() { cudaFree(p_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  T* get(size_t offset = 0) const { return p_ + offset; }
  size_t size() const { return n_; }
  void upload(const std::vector<T>& h, size_t offset = 0) {
    require(offset + h.size() <= n_, "DeviceBuffer::upload: more elements than the buffer holds");
    CUDA_CHECK(cudaMemcpy(p_ + offset, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() const { return download(n_); }
  std::vector<T> download(size_t n, size_t offset = 0) const {
    require(offset + n <= std::max<size_t>(n_, 1), "DeviceBuffer::download: past the buffer's end");
    std::vector<T> h(n);
    CUDA_CHECK(cudaMemcpy(h.data(), p_ + offset, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }
  // Every byte set to `byte`; poison(): 0xFF, a NaN in every float, -1 in every signed integer.
  void fill_bytes(int byte) { CUDA_CHECK(cudaMemset(p_, byte, std::max<size_t>(n_, 1) * sizeof(T))); }
  void poison() { fill_bytes(0xFF); }

 private:
  T* p_ = nullptr;
  size_t n_;
};

// The fixture of the GPU tests: without a CUDA device skips (fails where MOERL_REQUIRE_GPU=1, as on the GPU machine:
// scripts/device-run.sh, so that a device that cannot start fails the run instead of skipping it), prints the seed
// once per binary and records it in each test's properties.
class GpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    int devices = 0;
    const cudaError_t e = cudaGetDeviceCount(&devices);
    if (e != cudaSuccess || devices == 0) {
      const char* require = std::getenv("MOERL_REQUIRE_GPU");
      if (require != nullptr && std::string(require) == "1")
        FAIL() << "no CUDA device (" << cudaGetErrorString(e) << ") and MOERL_REQUIRE_GPU=1";
      GTEST_SKIP() << "no CUDA device (" << cudaGetErrorString(e) << ")";
    }
    static bool printed = false;
    if (!printed) std::printf("moerl_gpu_tests: %s\n", seed_note().c_str());
    printed = true;
    RecordProperty("seed", std::to_string(run_seed()));
  }
};

// Median milliseconds of one call of fn over `runs` calls after `warmup` untimed ones, each call timed alone with
// CUDA events on the legacy default stream (information printed by the tests, never asserted).
template <class F> double median_ms(F&& fn, int runs = 10, int warmup = 3) {
  for (int i = 0; i < warmup; ++i) fn();
  cudaEvent_t start, stop;
  CUDA_CHECK(cudaEventCreate(&start));
  CUDA_CHECK(cudaEventCreate(&stop));
  std::vector<float> ms(static_cast<size_t>(std::max(runs, 1)));
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
  const size_t n = ms.size();
  return n % 2 == 1 ? ms[n / 2] : (ms[n / 2 - 1] + ms[n / 2]) / 2;
}

}  // namespace moerl::gpu_test
