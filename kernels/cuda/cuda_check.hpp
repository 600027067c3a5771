// Checked CUDA and cuBLASLt calls. A failing call throws moerl::Error naming the call, the error and
// file:line, so a GPU test fails with a readable message instead of crashing later on a sticky error.
//   CUDA_CHECK(cudaMalloc(&p, bytes));
//   my_kernel<<<grid, block, 0, stream>>>(...); CUDA_CHECK_LAUNCH();
//   CUBLAS_CHECK(cublasLtMatmul(...));
// Usable from .cu and plain .cpp files (host code only).
#pragma once
#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <string>

#include "runtime/error.hpp"

namespace moerl::cuda_detail {

[[noreturn]] inline void fail_cuda(cudaError_t e, const char* call, const char* file, int line) {
  throw Error(std::string("CUDA error ") + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ") in " + call +
              " at " + file + ":" + std::to_string(line));
}

[[noreturn]] inline void fail_cublas(cublasStatus_t s, const char* call, const char* file, int line) {
  throw Error(std::string("cuBLASLt error ") + cublasLtGetStatusName(s) + " (" + cublasLtGetStatusString(s) +
              ") in " + call + " at " + file + ":" + std::to_string(line));
}

}  // namespace moerl::cuda_detail

#define CUDA_CHECK(call)                                                                       \
  do {                                                                                         \
    const cudaError_t moerl_cuda_err_ = (call);                                                \
    if (moerl_cuda_err_ != cudaSuccess)                                                        \
      ::moerl::cuda_detail::fail_cuda(moerl_cuda_err_, #call, __FILE__, __LINE__);             \
  } while (0)

// After a kernel launch: catches bad launch configurations (and earlier asynchronous errors).
#define CUDA_CHECK_LAUNCH() CUDA_CHECK(cudaGetLastError())

#define CUBLAS_CHECK(call)                                                                     \
  do {                                                                                         \
    const cublasStatus_t moerl_cublas_st_ = (call);                                            \
    if (moerl_cublas_st_ != CUBLAS_STATUS_SUCCESS)                                             \
      ::moerl::cuda_detail::fail_cublas(moerl_cublas_st_, #call, __FILE__, __LINE__);          \
  } while (0)
