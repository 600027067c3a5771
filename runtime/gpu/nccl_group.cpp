#include "runtime/gpu/nccl_group.hpp"

#include <thread>

#include "kernels/cuda/cuda_check.hpp"
#include "runtime/error.hpp"

namespace moerl::gpu {
namespace {

using Clock = std::chrono::steady_clock;

std::string nccl_error(ncclResult_t r, ncclComm_t comm) {
  std::string s = ncclGetErrorString(r);
  const char* last = ncclGetLastError(comm);
  if (last != nullptr && *last != '\0') s += std::string(": ") + last;
  return s;
}

// Backs off from spinning to short sleeps: collectives of a training step finish in micro- to milliseconds,
// a stuck peer is only noticed at the deadline anyway.
void pause(int& polls) {
  if (++polls < 200)
    std::this_thread::yield();
  else
    std::this_thread::sleep_for(std::chrono::microseconds(polls < 2000 ? 20 : 200));
}

}  // namespace

NcclGroup::NcclGroup(int ranks, std::chrono::milliseconds timeout) : ranks_(ranks), timeout_(timeout) {
  require(ranks >= 1, [&] { return "NCCL group: " + std::to_string(ranks) + " ranks, expected at least one"; });
  require(timeout.count() > 0, "NCCL group: the timeout must be positive");
  const ncclResult_t r = ncclGetUniqueId(&id_);
  require(r == ncclSuccess, [&] { return "NCCL group: ncclGetUniqueId failed: " + nccl_error(r, nullptr); });
}

void NcclGroup::abort(const std::string& reason) {
  {
    const std::lock_guard lock(mutex_);
    if (reason_.empty()) reason_ = reason;
  }
  aborted_.store(true, std::memory_order_release);
}

std::string NcclGroup::abort_reason() const {
  const std::lock_guard lock(mutex_);
  return reason_;
}

NcclRank::NcclRank(NcclGroup& group, int rank) : group_(group), rank_(rank) {
  require(rank >= 0 && rank < group.size(),
          [&] { return "NCCL rank " + std::to_string(rank) + " outside [0, " + std::to_string(group.size()) + ")"; });
  CUDA_CHECK(cudaGetDevice(&device_));
  const std::string what = describe("communicator creation", 0);
  if (group_.aborted()) throw Error(what + ": the group was aborted: " + group_.abort_reason());
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;  // calls return ncclInProgress instead of blocking: every wait below can time out
  const auto deadline = Clock::now() + group_.timeout();
  const ncclResult_t r = ncclCommInitRankConfig(&comm_, group_.size(), group_.id(), rank_, &config);
  if (r != ncclSuccess && r != ncclInProgress) {
    comm_ = nullptr;  // nothing to abort
    group_.abort(what + ": " + nccl_error(r, nullptr));
    throw Error(what + ": " + nccl_error(r, nullptr));
  }
  settle(what, r, deadline);
}

NcclRank::~NcclRank() {
  if (comm_ == nullptr) return;
  if (!group_.aborted()) {
    // Finalize is collective: it waits for the peers' outstanding work, which the deadline bounds.
    const auto deadline = Clock::now() + group_.timeout();
    ncclResult_t r = ncclCommFinalize(comm_);
    int polls = 0;
    while (r == ncclInProgress && Clock::now() < deadline && !group_.aborted()) {
      pause(polls);
      if (ncclCommGetAsyncError(comm_, &r) != ncclSuccess) break;
    }
    if (r == ncclSuccess) {
      (void)ncclCommDestroy(comm_);
      return;
    }
  }
  (void)ncclCommAbort(comm_);  // never throws from a destructor
}

std::string NcclRank::describe(const char* op, size_t count) const {
  std::string s = std::string("NCCL ") + op;
  if (count > 0) s += " of " + std::to_string(count) + " elements";
  return s + " (rank " + std::to_string(rank_) + " of " + std::to_string(group_.size()) + ", cuda:" +
         std::to_string(device_) + ")";
}

void NcclRank::fail(const std::string& message) {
  if (comm_ != nullptr) {
    (void)ncclCommAbort(comm_);  // also stops this rank's kernels still waiting for a peer
    comm_ = nullptr;
  }
  group_.abort(message);
  throw Error(message);
}

void NcclRank::settle(const std::string& what, ncclResult_t result, Clock::time_point deadline) {
  int polls = 0;
  while (result == ncclInProgress) {
    if (group_.aborted()) fail(what + ": abandoned, the group was aborted: " + group_.abort_reason());
    if (Clock::now() >= deadline)
      fail(what + ": timed out after " + std::to_string(group_.timeout().count()) + " ms waiting for the other ranks");
    pause(polls);
    const ncclResult_t q = ncclCommGetAsyncError(comm_, &result);
    if (q != ncclSuccess) result = q;
  }
  if (result != ncclSuccess) fail(what + ": " + nccl_error(result, comm_));
}

void NcclRank::wait_stream(const std::string& what, cudaStream_t stream, Clock::time_point deadline) {
  int polls = 0;
  for (;;) {
    const cudaError_t q = cudaStreamQuery(stream);
    if (q == cudaSuccess) return;
    if (q != cudaErrorNotReady)
      fail(what + ": CUDA error " + cudaGetErrorName(q) + " (" + cudaGetErrorString(q) + ") on the stream");
    ncclResult_t state = ncclSuccess;
    const ncclResult_t r = ncclCommGetAsyncError(comm_, &state);
    if (r != ncclSuccess || (state != ncclSuccess && state != ncclInProgress))
      fail(what + ": " + nccl_error(r != ncclSuccess ? r : state, comm_));
    if (group_.aborted()) fail(what + ": abandoned, the group was aborted: " + group_.abort_reason());
    if (Clock::now() >= deadline)
      fail(what + ": timed out after " + std::to_string(group_.timeout().count()) +
           " ms (a rank did not join, or its GPU work did not finish)");
    pause(polls);
  }
}

template <class Issue> void NcclRank::run(const char* op, size_t count, cudaStream_t stream, Issue&& issue) {
  const std::string what = describe(op, count);
  if (comm_ == nullptr) throw Error(what + ": this rank's communicator was aborted: " + group_.abort_reason());
  if (group_.aborted()) fail(what + ": abandoned, the group was aborted: " + group_.abort_reason());
  const auto deadline = Clock::now() + group_.timeout();
  const ncclResult_t r = issue();
  if (r != ncclSuccess && r != ncclInProgress) fail(what + ": " + nccl_error(r, comm_));
  settle(what, r, deadline);
  wait_stream(what, stream, deadline);
}

void NcclRank::allreduce_sum(const float* send, float* recv, size_t count, cudaStream_t stream) {
  run("allreduce", count, stream, [&] { return ncclAllReduce(send, recv, count, ncclFloat32, ncclSum, comm_, stream); });
}

void NcclRank::allreduce_sum(const double* send, double* recv, size_t count, cudaStream_t stream) {
  run("allreduce", count, stream, [&] { return ncclAllReduce(send, recv, count, ncclFloat64, ncclSum, comm_, stream); });
}

void NcclRank::reduce_scatter_sum(const float* send, float* recv, size_t recv_count, cudaStream_t stream) {
  run("reduce_scatter", recv_count, stream,
      [&] { return ncclReduceScatter(send, recv, recv_count, ncclFloat32, ncclSum, comm_, stream); });
}

void NcclRank::allgather(const float* send, float* recv, size_t send_count, cudaStream_t stream) {
  run("allgather", send_count, stream, [&] { return ncclAllGather(send, recv, send_count, ncclFloat32, comm_, stream); });
}

}  // namespace moerl::gpu
