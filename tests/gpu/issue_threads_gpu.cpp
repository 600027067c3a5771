// Tests of cuda_detail::IssueThreads (kernels/cuda/issue_threads.hpp), the host threads that issue the routed
// experts' lanes side by side: every job runs once, job 0 on the caller and the others on threads of their own with
// the caller's device current, run() returns only after all of them, and an exception in any job reaches the caller
// (the threads stay usable after it).
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <set>
#include <stdexcept>
#include <thread>
#include <vector>

#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/issue_threads.hpp"
#include "tests/gpu/gpu_test_support.hpp"

namespace moerl {
namespace {

class IssueThreadsGpu : public gpu_test::GpuTest {};

TEST_F(IssueThreadsGpu, RunsEveryJobOnceOnItsOwnThreadWithTheCallersDevice) {
  int device = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  cuda_detail::IssueThreads threads(3, device);
  for (const int n : {4, 2, 1, 4}) {  // fewer jobs than threads leave the rest idle
    std::vector<int> runs(4, 0), devices(4, -1);
    std::vector<std::thread::id> ids(4);
    std::atomic<int> finished{0};
    threads.run(n, [&](int job) {
      std::this_thread::sleep_for(std::chrono::milliseconds(job == 0 ? 0 : 20));  // the caller's returns first
      ++runs[job];
      ids[job] = std::this_thread::get_id();
      cudaGetDevice(&devices[job]);
      ++finished;
    });
    EXPECT_EQ(finished.load(), n) << "run() returned before every job had";
    for (int j = 0; j < 4; ++j) EXPECT_EQ(runs[j], j < n ? 1 : 0) << "job " << j << " of " << n;
    EXPECT_EQ(ids[0], std::this_thread::get_id()) << "job 0 runs on the caller";
    std::set<std::thread::id> distinct(ids.begin(), ids.begin() + n);
    EXPECT_EQ(static_cast<int>(distinct.size()), n) << "each job on a thread of its own";
    for (int j = 0; j < n; ++j) EXPECT_EQ(devices[j], device) << "job " << j;
  }
}

TEST_F(IssueThreadsGpu, AJobsExceptionReachesTheCallerAfterTheOthersFinish) {
  cuda_detail::IssueThreads threads(2, 0);
  std::atomic<int> finished{0};
  auto failing = [&](int failing_job) {
    return [&, failing_job](int job) {
      if (job != failing_job) std::this_thread::sleep_for(std::chrono::milliseconds(10));
      ++finished;
      if (job == failing_job) throw std::runtime_error("job " + std::to_string(job) + " failed");
    };
  };
  for (const int bad : {2, 0}) {  // a worker's, then the caller's
    finished = 0;
    try {
      threads.run(3, failing(bad));
      ADD_FAILURE() << "no exception from job " << bad;
    } catch (const std::runtime_error& e) {
      EXPECT_EQ(std::string(e.what()), "job " + std::to_string(bad) + " failed");
    }
    EXPECT_EQ(finished.load(), 3) << "run() threw before every job had finished";
  }
  threads.run(3, [&](int) { ++finished; });  // still usable
  EXPECT_EQ(finished.load(), 6);
}

}  // namespace
}  // namespace moerl
