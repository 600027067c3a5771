#include "runtime/parallel/collectives.hpp"

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <mutex>

#include "runtime/error.hpp"

namespace moerl {

std::vector<size_t> even_counts(size_t total, int ranks) {
  require(ranks > 0, "even_counts: ranks must be positive, got " + std::to_string(ranks));
  const size_t r = static_cast<size_t>(ranks), base = total / r, extra = total % r;
  std::vector<size_t> counts(r);
  for (size_t i = 0; i < r; ++i) counts[i] = base + (i < extra ? 1 : 0);
  return counts;
}

// What each rank publishes for the operation in flight: its buffers and sizes, checked against its peers'.
struct Posted {
  const void* in = nullptr;
  void* out = nullptr;
  size_t n = 0;
  std::span<const size_t> counts;
  int root = 0;
};

struct InProcessGroup::State {
  int size;
  std::chrono::milliseconds timeout;
  std::mutex mu;
  std::condition_variable cv;
  int arrived = 0;
  uint64_t generation = 0;
  bool broken = false;
  std::vector<Posted> posted;

  // Waits until every rank has arrived (generation barrier). Throws on timeout or when another rank timed
  // out; either breaks the group for good.
  void sync(int rank, const char* op) {
    std::unique_lock lock(mu);
    auto fail = [&](const std::string& why) {
      broken = true;
      cv.notify_all();
      throw Error("in-process collectives: " + std::string(op) + " on rank " + std::to_string(rank) + " of " +
                  std::to_string(size) + ": " + why);
    };
    if (broken) fail("the group is broken (a peer timed out or failed earlier)");
    const uint64_t gen = generation;
    if (++arrived == size) {
      arrived = 0;
      ++generation;
      cv.notify_all();
      return;
    }
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    if (!cv.wait_until(lock, deadline, [&] { return generation != gen || broken; }))
      fail("timed out after " + std::to_string(timeout.count()) + " ms waiting for the other ranks");
    if (generation == gen) fail("the group is broken (a peer timed out or failed earlier)");
  }
};

namespace {

class InProcessMember final : public Collectives {
 public:
  InProcessMember(std::shared_ptr<InProcessGroup::State> s, int rank) : s_(std::move(s)), rank_(rank) {}

  int rank() const override { return rank_; }
  int size() const override { return s_->size; }

  void allreduce_sum(float* data, size_t n) override { allreduce(data, n); }
  void allreduce_sum(double* data, size_t n) override { allreduce(data, n); }

  void reduce_scatter_sum(const float* in, float* out, std::span<const size_t> counts) override {
    const char* op = "reduce_scatter_sum";
    begin(op, Posted{in, out, 0, counts, 0});
    check_counts(op, counts);
    size_t offset = 0;
    for (int r = 0; r < rank_; ++r) offset += counts[r];
    const size_t n = counts[rank_];
    const auto& posted = s_->posted;
    std::copy_n(static_cast<const float*>(posted[0].in) + offset, n, out);
    for (int r = 1; r < s_->size; ++r) {
      const float* src = static_cast<const float*>(posted[r].in) + offset;
      for (size_t i = 0; i < n; ++i) out[i] += src[i];
    }
    s_->sync(rank_, op);  // peers may still read our input
  }

  void allgather(const float* in, float* out, std::span<const size_t> counts) override {
    const char* op = "allgather";
    begin(op, Posted{in, out, 0, counts, 0});
    check_counts(op, counts);
    size_t offset = 0;
    for (int r = 0; r < s_->size; ++r) {
      const float* src = static_cast<const float*>(s_->posted[r].in);
      // Our own block may already sit in place; the peers' inputs are never written by us.
      if (src != out + offset) std::memmove(out + offset, src, counts[r] * sizeof(float));
      offset += counts[r];
    }
    s_->sync(rank_, op);
  }

  void broadcast(float* data, size_t n, int root) override {
    const char* op = "broadcast";
    require(root >= 0 && root < s_->size, "broadcast: root " + std::to_string(root) + " is not a rank of a group of " +
                                              std::to_string(s_->size));
    begin(op, Posted{data, nullptr, n, {}, root});
    for (const Posted& p : s_->posted)
      require(p.n == n && p.root == root, "in-process collectives: broadcast on rank " + std::to_string(rank_) +
                                              ": the ranks disagree on the size or the root");
    if (rank_ != root) std::copy_n(static_cast<const float*>(s_->posted[root].in), n, data);
    s_->sync(rank_, op);
  }

  void barrier() override { s_->sync(rank_, "barrier"); }

 private:
  std::shared_ptr<InProcessGroup::State> s_;
  int rank_;

  // Publishes this rank's arguments and waits for every peer's.
  void begin(const char* op, const Posted& mine) {
    {
      std::lock_guard lock(s_->mu);
      s_->posted[rank_] = mine;
    }
    s_->sync(rank_, op);
  }

  void check_counts(const char* op, std::span<const size_t> counts) const {
    require(counts.size() == static_cast<size_t>(s_->size),
            "in-process collectives: " + std::string(op) + " on rank " + std::to_string(rank_) + ": " +
                std::to_string(counts.size()) + " counts for a group of " + std::to_string(s_->size));
    for (const Posted& p : s_->posted)
      require(std::equal(p.counts.begin(), p.counts.end(), counts.begin(), counts.end()),
              "in-process collectives: " + std::string(op) + " on rank " + std::to_string(rank_) +
                  ": the ranks passed different counts");
  }

  template <class T>
  void allreduce(T* data, size_t n) {
    const char* op = "allreduce_sum";
    begin(op, Posted{data, nullptr, n, {}, 0});
    for (const Posted& p : s_->posted)
      require(p.n == n, "in-process collectives: allreduce_sum on rank " + std::to_string(rank_) + ": size " +
                            std::to_string(n) + " here, " + std::to_string(p.n) + " on a peer");
    std::vector<T> acc(static_cast<const T*>(s_->posted[0].in), static_cast<const T*>(s_->posted[0].in) + n);
    for (int r = 1; r < s_->size; ++r) {
      const T* src = static_cast<const T*>(s_->posted[r].in);
      for (size_t i = 0; i < n; ++i) acc[i] += src[i];
    }
    s_->sync(rank_, op);  // everyone has read every input: now the inputs may be overwritten
    std::copy(acc.begin(), acc.end(), data);
  }
};

}  // namespace

InProcessGroup::InProcessGroup(int size, std::chrono::milliseconds timeout) : state_(std::make_shared<State>()) {
  require(size > 0, "InProcessGroup: size must be positive, got " + std::to_string(size));
  require(timeout.count() > 0, "InProcessGroup: timeout must be positive");
  state_->size = size;
  state_->timeout = timeout;
  state_->posted.resize(static_cast<size_t>(size));
  for (int r = 0; r < size; ++r) members_.push_back(std::make_unique<InProcessMember>(state_, r));
}

InProcessGroup::~InProcessGroup() = default;

int InProcessGroup::size() const { return state_->size; }

Collectives& InProcessGroup::member(int rank) {
  require(rank >= 0 && rank < state_->size,
          "InProcessGroup: no rank " + std::to_string(rank) + " in a group of " + std::to_string(state_->size));
  return *members_[static_cast<size_t>(rank)];
}

void InProcessGroup::abort() {
  std::lock_guard lock(state_->mu);
  state_->broken = true;
  state_->cv.notify_all();
}

}  // namespace moerl
