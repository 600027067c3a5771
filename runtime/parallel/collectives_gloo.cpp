// Collectives over Gloo 0.5's TCP transport, built on its unbound buffers (point-to-point send/recv with a
// timeout): each rank receives the blocks it reduces straight from every peer and adds them in rank order,
// so the sums match InProcessGroup bit for bit (see collectives.hpp).
#include <gloo/common/error.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/file_store.h>
#include <gloo/rendezvous/hash_store.h>
#include <gloo/rendezvous/prefix_store.h>
#include <gloo/transport/tcp/device.h>
#include <gloo/transport/unbound_buffer.h>

#include <algorithm>
#include <cstring>
#include <mutex>

#include "runtime/error.hpp"
#include "runtime/parallel/collectives.hpp"
#include "runtime/parallel/gloo_context.hpp"

namespace moerl {
namespace {

// A store the threads of one process may share: several parties of a run connect their groups at once through
// one rendezvous. Gloo's FileStore is not safe for that: set() appends the path it wrote to a member vector
// without a lock, so two parties' concurrent rendezvous corrupted the heap (AddressSanitizer: a double free in
// FileStore::set from two actor threads; the rare "double free or corruption" of a two-process DP x TP run, and
// its crashes later in Gloo's teardown). set runs under a mutex; get and wait only read the folder (get first
// waits for its key's file) and run unlocked, so one party's wait for its peers never holds up another's set.
class LockedStore final : public gloo::rendezvous::Store {
 public:
  explicit LockedStore(std::shared_ptr<gloo::rendezvous::Store> inner) : inner_(std::move(inner)) {}
  void set(const std::string& key, const std::vector<char>& data) override {
    const std::lock_guard lock(mutex_);
    inner_->set(key, data);
  }
  std::vector<char> get(const std::string& key) override { return inner_->get(key); }
  void wait(const std::vector<std::string>& keys) override { inner_->wait(keys); }
  void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& timeout) override {
    inner_->wait(keys, timeout);
  }

 private:
  std::shared_ptr<gloo::rendezvous::Store> inner_;
  std::mutex mutex_;
};

}  // namespace

GlooRendezvous GlooRendezvous::in_folder(const std::filesystem::path& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  require(!ec && std::filesystem::is_directory(dir),
          "Gloo rendezvous: cannot create the folder " + dir.string() + ": " + ec.message());
  GlooRendezvous r;
  r.store = std::make_shared<LockedStore>(std::make_shared<gloo::rendezvous::FileStore>(dir.string()));
  return r;
}

GlooRendezvous GlooRendezvous::in_memory() {
  GlooRendezvous r;
  r.store = std::make_shared<gloo::rendezvous::HashStore>();
  return r;
}

namespace {

using Clock = std::chrono::steady_clock;
using Buffer = std::unique_ptr<gloo::transport::UnboundBuffer>;

class GlooCollectives final : public Collectives {
 public:
  GlooCollectives(std::shared_ptr<gloo::rendezvous::Context> context, std::chrono::milliseconds timeout)
      : ctx_(std::move(context)), timeout_(timeout) {}

  int rank() const override { return ctx_->rank; }
  int size() const override { return ctx_->size; }

  void allreduce_sum(float* data, size_t n) override { allreduce(data, n); }
  void allreduce_sum(double* data, size_t n) override { allreduce(data, n); }

  void reduce_scatter_sum(const float* in, float* out, std::span<const size_t> counts) override {
    guarded("reduce_scatter_sum", [&](uint64_t slot, Clock::time_point deadline) {
      reduce_scatter(in, out, counts, slot, deadline);
    });
  }

  void allgather(const float* in, float* out, std::span<const size_t> counts) override {
    guarded("allgather", [&](uint64_t slot, Clock::time_point deadline) {
      gather(in, out, counts, slot, deadline);
    });
  }

  void broadcast(float* data, size_t n, int root) override {
    require(root >= 0 && root < size(), "broadcast: root " + std::to_string(root) + " is not a rank of a group of " +
                                            std::to_string(size()));
    guarded("broadcast", [&](uint64_t slot, Clock::time_point deadline) {
      if (n == 0) return;
      std::vector<Buffer> pending;
      if (rank() == root) {
        for (int r = 0; r < size(); ++r) {
          if (r == root) continue;
          pending.push_back(ctx_->createUnboundBuffer(data, n * sizeof(float)));
          pending.back()->send(r, slot);
        }
        for (Buffer& b : pending) wait_send(*b, deadline);
      } else {
        Buffer b = ctx_->createUnboundBuffer(data, n * sizeof(float));
        b->recv(root, slot);
        wait_recv(*b, deadline);
      }
    });
  }

  void barrier() override {
    double token = 0;
    allreduce(&token, 1);
  }

 private:
  std::shared_ptr<gloo::rendezvous::Context> ctx_;
  std::chrono::milliseconds timeout_;
  uint64_t ops_ = 0;  // operations started; every rank counts the same, so slots pair up
  bool broken_ = false;

  // Runs one operation with its own slot and deadline; Gloo's errors become moerl::Error.
  template <class F>
  void guarded(const char* op, F&& body) {
    const std::string where = "Gloo collectives: " + std::string(op) + " on rank " + std::to_string(rank()) +
                              " of " + std::to_string(size());
    require(!broken_, where + ": the group is broken (an earlier operation failed)");
    const uint64_t slot = (++ops_) << 2;  // unique per operation; the low bits number its phases
    try {
      body(slot, Clock::now() + timeout_);
    } catch (const std::exception& e) {
      broken_ = true;
      throw Error(where + " (timeout " + std::to_string(timeout_.count()) + " ms): " + e.what());
    }
  }

  static std::chrono::milliseconds left(Clock::time_point deadline) {
    return std::max(std::chrono::milliseconds(1),
                    std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()));
  }
  static void wait_send(gloo::transport::UnboundBuffer& b, Clock::time_point deadline) {
    if (!b.waitSend(left(deadline))) throw Error("send aborted");
  }
  static void wait_recv(gloo::transport::UnboundBuffer& b, Clock::time_point deadline) {
    if (!b.waitRecv(left(deadline))) throw Error("receive aborted");
  }

  void check_counts(std::span<const size_t> counts) const {
    require(counts.size() == static_cast<size_t>(size()),
            std::to_string(counts.size()) + " counts for a group of " + std::to_string(size()));
  }

  // Sends block r of `in` to rank r, receives this rank's block from every peer, sums in rank order.
  template <class T>
  void reduce_scatter(const T* in, T* out, std::span<const size_t> counts, uint64_t slot,
                      Clock::time_point deadline) {
    check_counts(counts);
    const int R = size(), me = rank();
    std::vector<size_t> offset(static_cast<size_t>(R) + 1, 0);
    for (int r = 0; r < R; ++r) offset[r + 1] = offset[r] + counts[r];
    const size_t n = counts[me];
    std::vector<T> received(n * static_cast<size_t>(R));  // block from rank r at r * n
    std::vector<Buffer> sends, recvs;
    for (int r = 0; r < R; ++r) {
      if (r == me) continue;
      if (counts[r] > 0) {
        // Gloo only reads a send buffer; its API takes void*.
        sends.push_back(ctx_->createUnboundBuffer(const_cast<T*>(in + offset[r]), counts[r] * sizeof(T)));
        sends.back()->send(r, slot);
      }
      if (n > 0) {
        recvs.push_back(ctx_->createUnboundBuffer(received.data() + r * n, n * sizeof(T)));
        recvs.back()->recv(r, slot);
      }
    }
    for (Buffer& b : recvs) wait_recv(*b, deadline);
    for (Buffer& b : sends) wait_send(*b, deadline);
    auto block = [&](int r) { return r == me ? in + offset[me] : received.data() + r * n; };
    std::copy_n(block(0), n, out);
    for (int r = 1; r < R; ++r) {
      const T* src = block(r);
      for (size_t i = 0; i < n; ++i) out[i] += src[i];
    }
  }

  // Sends this rank's block to every peer and receives theirs into place.
  template <class T>
  void gather(const T* in, T* out, std::span<const size_t> counts, uint64_t slot, Clock::time_point deadline) {
    check_counts(counts);
    const int R = size(), me = rank();
    size_t my_offset = 0;
    for (int r = 0; r < me; ++r) my_offset += counts[r];
    if (in != out + my_offset) std::memmove(out + my_offset, in, counts[me] * sizeof(T));
    std::vector<Buffer> sends, recvs;
    size_t offset = 0;
    for (int r = 0; r < R; ++r) {
      if (r != me && counts[me] > 0) {
        sends.push_back(ctx_->createUnboundBuffer(out + my_offset, counts[me] * sizeof(T)));
        sends.back()->send(r, slot);
      }
      if (r != me && counts[r] > 0) {
        recvs.push_back(ctx_->createUnboundBuffer(out + offset, counts[r] * sizeof(T)));
        recvs.back()->recv(r, slot);
      }
      offset += counts[r];
    }
    for (Buffer& b : recvs) wait_recv(*b, deadline);
    for (Buffer& b : sends) wait_send(*b, deadline);
  }

  // Reduce-scatter then allgather of even blocks: each element summed once, in rank order, by its owner.
  template <class T>
  void allreduce(T* data, size_t n) {
    guarded("allreduce_sum", [&](uint64_t slot, Clock::time_point deadline) {
      const std::vector<size_t> counts = even_counts(n, size());
      size_t my_offset = 0;
      for (int r = 0; r < rank(); ++r) my_offset += counts[r];
      std::vector<T> mine(counts[rank()]);
      reduce_scatter(data, mine.data(), counts, slot, deadline);
      std::copy(mine.begin(), mine.end(), data + my_offset);
      gather(data + my_offset, data, counts, slot + 1, deadline);
    });
  }
};

}  // namespace

std::shared_ptr<gloo::rendezvous::Context> connect_gloo_context(const GlooRendezvous& rendezvous, int rank,
                                                                int size, const GlooOptions& options) {
  const std::string where = "Gloo rendezvous (prefix " + options.prefix + ", rank " + std::to_string(rank) +
                            " of " + std::to_string(size) + ")";
  require(rendezvous.store != nullptr, where + ": no store (use GlooRendezvous::in_folder or in_memory)");
  require(size > 0 && rank >= 0 && rank < size, where + ": rank must lie in [0, size)");
  require(options.timeout.count() > 0, where + ": timeout must be positive");
  try {
    gloo::transport::tcp::attr attr;
    attr.hostname = options.hostname;
    auto device = gloo::transport::tcp::CreateDevice(attr);
    auto context = std::make_shared<gloo::rendezvous::Context>(rank, size);
    context->setTimeout(options.timeout);
    gloo::rendezvous::PrefixStore store(options.prefix, *rendezvous.store);
    context->connectFullMesh(store, device);
    return context;
  } catch (const std::exception& e) {
    throw Error(where + ": " + e.what());
  }
}

std::unique_ptr<Collectives> connect_gloo(const GlooRendezvous& rendezvous, int rank, int size,
                                          const GlooOptions& options) {
  return std::make_unique<GlooCollectives>(connect_gloo_context(rendezvous, rank, size, options), options.timeout);
}

}  // namespace moerl
