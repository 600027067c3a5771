// NCCL collectives on FP32 (and FP64) device buffers, for data parallelism over the GPUs of one process: one
// communicator per rank, each rank a thread with its own device current (the CPU side's collectives.hpp over
// Gloo, on GPUs). The communicators are non-blocking (ncclConfig_t::blocking = 0), so no call can hang: every
// wait polls the communicator's asynchronous error, the group's abort flag and a deadline, and fails with a
// moerl::Error naming the operation, the element count, the rank and the device.
//
//   NcclGroup group(2, std::chrono::seconds(60));             // any thread: the unique id, the abort flag
//   // on thread r, with cudaSetDevice(r) done:
//   NcclRank comm(group, r);                                  // collective: every rank constructs it
//   comm.reduce_scatter_sum(grads, grads + r * n, n, stream); // in place: rank r's sum lands in its shard
//   comm.allgather(values + r * n, values, n, stream);
//
// Every operation returns once it has completed on `stream` (and so has everything queued on it before): the
// caller's buffers are final and the host may read them. An error or a timeout on one rank aborts its
// communicator and the whole group: the other ranks' pending or next operations throw too, instead of waiting
// for a peer that will not come.
#pragma once
#include <cuda_runtime_api.h>
#include <nccl.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <mutex>
#include <string>

namespace moerl::gpu {

class NcclGroup {
 public:
  // `ranks` communicators to be made from one ncclUniqueId; `timeout` bounds every wait of every rank (an
  // operation's peers arriving and its completion; communicator creation and teardown).
  NcclGroup(int ranks, std::chrono::milliseconds timeout);
  NcclGroup(const NcclGroup&) = delete;
  NcclGroup& operator=(const NcclGroup&) = delete;

  int size() const { return ranks_; }
  std::chrono::milliseconds timeout() const { return timeout_; }
  const ncclUniqueId& id() const { return id_; }

  // Marks the group failed (the first reason is kept); any thread. Every rank's pending or next operation
  // throws, naming the reason.
  void abort(const std::string& reason);
  bool aborted() const { return aborted_.load(std::memory_order_acquire); }
  std::string abort_reason() const;

 private:
  int ranks_;
  std::chrono::milliseconds timeout_;
  ncclUniqueId id_{};
  std::atomic<bool> aborted_{false};
  mutable std::mutex mutex_;
  std::string reason_;
};

// One rank's communicator. Made, used and destroyed on the rank's own thread with its device current; the
// group must outlive it. All ranks construct (and destroy) theirs concurrently: both are collective.
class NcclRank {
 public:
  NcclRank(NcclGroup& group, int rank);
  ~NcclRank();  // ncclCommFinalize + ncclCommDestroy; ncclCommAbort after a failure or an aborted group
  NcclRank(const NcclRank&) = delete;
  NcclRank& operator=(const NcclRank&) = delete;

  int rank() const { return rank_; }
  int size() const { return group_.size(); }
  int device() const { return device_; }

  // recv[i] = Σ over ranks of send[i], i < count (recv may be send).
  void allreduce_sum(const float* send, float* recv, size_t count, cudaStream_t stream);
  void allreduce_sum(const double* send, double* recv, size_t count, cudaStream_t stream);
  // send: [size() * recv_count]; recv[i] = Σ over ranks of send[rank() * recv_count + i]. In place when
  // recv == send + rank() * recv_count.
  void reduce_scatter_sum(const float* send, float* recv, size_t recv_count, cudaStream_t stream);
  // recv: [size() * send_count]; recv[r * send_count + i] = rank r's send[i]. In place when
  // send == recv + rank() * send_count.
  void allgather(const float* send, float* recv, size_t send_count, cudaStream_t stream);

 private:
  template <class Issue> void run(const char* op, size_t count, cudaStream_t stream, Issue&& issue);
  // Polls until the communicator's state leaves ncclInProgress; throws on an error, the group's abort or the
  // deadline.
  void settle(const std::string& what, ncclResult_t result, std::chrono::steady_clock::time_point deadline);
  void wait_stream(const std::string& what, cudaStream_t stream, std::chrono::steady_clock::time_point deadline);
  std::string describe(const char* op, size_t count) const;
  [[noreturn]] void fail(const std::string& message);  // aborts this communicator and the group, throws

  NcclGroup& group_;
  int rank_;
  int device_ = -1;
  ncclComm_t comm_ = nullptr;
};

}  // namespace moerl::gpu
