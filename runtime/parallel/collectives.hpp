// The data plane between CPU ranks: collectives on float (and double) buffers for data and tensor
// parallelism. One Collectives object is one rank's handle on one group; every rank of the group calls the
// same operations in the same order with the same sizes.
//
// Two implementations with the same arithmetic:
//   InProcessGroup: threads of one process exchange pointers (no copies through a transport).
//   connect_gloo:   Gloo 0.5 over TCP, between threads (in-memory HashStore rendezvous) or processes
//                   (FileStore rendezvous in a folder).
// Sums are deterministic and identical on every rank and in both implementations: element i of a sum is
// ((x_0[i] + x_1[i]) + x_2[i]) + ..., always in rank order, whatever the group's size or timing. Gloo's own
// ring allreduce adds in an order that depends on the element's chunk, so it is not used; each rank instead
// receives the blocks it reduces from every peer (the same bytes on the wire as a ring reduce-scatter).
//
// Every operation waits at most the group's timeout for its peers and then throws moerl::Error naming the
// operation and rank, so a dead or missing peer never hangs the caller. After a timeout the group is broken.
#pragma once
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace gloo::rendezvous {
class Store;
}

namespace moerl {

class Collectives {
 public:
  virtual ~Collectives() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;

  // data[n] <- Σ_ranks data[n], in place.
  virtual void allreduce_sum(float* data, size_t n) = 0;
  virtual void allreduce_sum(double* data, size_t n) = 0;
  // in: [Σ counts], the blocks of all ranks back to back in rank order; out: [counts[rank()]] <- the sum over
  // ranks of this rank's block. counts is the same on every rank; out must not overlap in.
  virtual void reduce_scatter_sum(const float* in, float* out, std::span<const size_t> counts) = 0;
  // in: [counts[rank()]]; out: [Σ counts] <- every rank's block in rank order. in may point into out at this
  // rank's block (in place).
  virtual void allgather(const float* in, float* out, std::span<const size_t> counts) = 0;
  // data[n] <- root's data[n] on every rank.
  virtual void broadcast(float* data, size_t n, int root) = 0;
  // Returns when every rank has entered.
  virtual void barrier() = 0;
};

// Blocks of `total` elements split over `ranks` as evenly as possible, the larger blocks first
// (total = 10, ranks = 4: 3, 3, 2, 2).
std::vector<size_t> even_counts(size_t total, int ranks);

// A group of `size` threads in one process. member(r) is the handle of rank r; each thread uses its own.
class InProcessGroup {
 public:
  explicit InProcessGroup(int size, std::chrono::milliseconds timeout = std::chrono::seconds(60));
  ~InProcessGroup();
  InProcessGroup(const InProcessGroup&) = delete;
  InProcessGroup& operator=(const InProcessGroup&) = delete;

  int size() const;
  // Valid while the group lives.
  Collectives& member(int rank);
  // Breaks the group for good: every waiting and future operation throws at once (a failed or killed rank
  // releases its peers instead of leaving them to time out).
  void abort();

  struct State;

 private:
  std::shared_ptr<State> state_;
  std::vector<std::unique_ptr<Collectives>> members_;
};

// Where Gloo ranks meet to exchange their addresses.
class GlooRendezvous {
 public:
  // A folder (FileStore): processes on one machine or on a shared filesystem, and the threads of each (the
  // store takes their calls one at a time). A key can be written once, so each run (and each group) needs a fresh
  // folder or prefix.
  static GlooRendezvous in_folder(const std::filesystem::path& dir);
  // An in-memory store (HashStore) for threads of one process; share the object between them.
  static GlooRendezvous in_memory();

  std::shared_ptr<gloo::rendezvous::Store> store;
};

struct GlooOptions {
  std::string prefix = "moerl";     // keys of this group in the store; distinct per group and per run
  std::string hostname = "127.0.0.1";  // the address this rank listens on
  std::chrono::milliseconds timeout = std::chrono::seconds(30);  // rendezvous and every operation
};

// Connects rank `rank` of a group of `size` (blocks until every rank has joined or the timeout passes,
// then throws moerl::Error).
std::unique_ptr<Collectives> connect_gloo(const GlooRendezvous& rendezvous, int rank, int size,
                                          const GlooOptions& options = {});

}  // namespace moerl
