// Host threads that issue GPU work side by side: the routed experts' lanes (kernels/cuda/moe_fp8_experts.cu) hand
// each lane's cuBLASLt calls to a thread of its own, since one call costs ~12 us of host time, about as long as one
// expert's GEMM runs on the H200 at bench-600m's sizes (moerl bench gpu --only gemm_fp8_experts: host_issue_us).
// A job's calls go to its own streams, so which thread issues them changes neither their order on a stream nor any
// result.
#pragma once
#include <cuda_runtime.h>

#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "kernels/cuda/cuda_check.hpp"

namespace moerl::cuda_detail {

class IssueThreads {
 public:
  // `workers` threads, each issuing on `device` (the CUDA device is per host thread).
  IssueThreads(int workers, int device) {
    for (int w = 0; w < workers; ++w) threads_.emplace_back([this, w, device] { work(w, device); });
  }
  ~IssueThreads() {
    {
      const std::lock_guard lock(mutex_);
      stop_ = true;
    }
    start_.notify_all();
    for (std::thread& t : threads_) t.join();
  }
  IssueThreads(const IssueThreads&) = delete;
  IssueThreads& operator=(const IssueThreads&) = delete;

  // job(0) on the calling thread and job(1) .. job(n - 1) on the workers (n - 1 <= workers), all at once; returns
  // when every job has returned, rethrowing the first exception (the caller's, else a worker's).
  void run(int n, const std::function<void(int)>& job) {
    {
      const std::lock_guard lock(mutex_);
      job_ = &job;
      active_ = n;
      pending_ = n - 1;
      worker_error_ = nullptr;
      ++generation_;
    }
    start_.notify_all();
    std::exception_ptr caller_error;
    try {
      job(0);
    } catch (...) {
      caller_error = std::current_exception();
    }
    std::unique_lock lock(mutex_);
    done_.wait(lock, [this] { return pending_ == 0; });
    if (caller_error) std::rethrow_exception(caller_error);
    if (worker_error_) std::rethrow_exception(worker_error_);
  }

 private:
  void work(int w, int device) {
    const cudaError_t set = cudaSetDevice(device);
    uint64_t seen = 0;
    std::unique_lock lock(mutex_);
    for (;;) {
      start_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      if (w + 1 >= active_) continue;  // not needed this time
      const std::function<void(int)>* job = job_;
      lock.unlock();
      std::exception_ptr error;
      try {
        CUDA_CHECK(set);  // a device this thread could not select fails the first job given to it
        (*job)(w + 1);
      } catch (...) {
        error = std::current_exception();
      }
      lock.lock();
      if (error && !worker_error_) worker_error_ = error;
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::mutex mutex_;
  std::condition_variable start_, done_;
  const std::function<void(int)>* job_ = nullptr;
  uint64_t generation_ = 0;
  int active_ = 0, pending_ = 0;
  bool stop_ = false;
  std::exception_ptr worker_error_;
  std::vector<std::thread> threads_;  // last: started once the members above exist
};

}  // namespace moerl::cuda_detail
