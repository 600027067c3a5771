#include <gtest/gtest.h>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gloo/rendezvous/store.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <functional>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "runtime/error.hpp"
#include "runtime/parallel/collectives.hpp"
#include "tests/support/scratch_dir.hpp"
#include "tests/support/on_threads.hpp"
#include "tests/support/reap.hpp"

namespace moerl {
namespace {

using test::on_threads;

using std::chrono::milliseconds;

GlooOptions gloo_options(const std::string& prefix, milliseconds timeout) {
  GlooOptions o;
  o.prefix = prefix;
  o.timeout = timeout;
  return o;
}

// Values of mixed magnitudes, so that the order of a sum shows in its last bits.
std::vector<float> inputs(int rank, size_t n) {
  std::mt19937 rng(1234u + static_cast<unsigned>(rank));
  std::uniform_real_distribution<float> mantissa(-1.0f, 1.0f);
  std::uniform_int_distribution<int> exponent(-12, 12);
  std::vector<float> v(n);
  for (float& x : v) x = std::ldexp(mantissa(rng), exponent(rng));
  return v;
}

// Everything one rank sees from the five operations, for comparing ranks and implementations.
struct Results {
  std::vector<float> allreduce, scattered, gathered, gathered_in_place, broadcast;
  std::vector<double> allreduce_double;
};

constexpr size_t kElements = 1001;  // odd: uneven blocks

Results exercise(Collectives& c) {
  const int R = c.size(), me = c.rank();
  Results out;
  out.allreduce = inputs(me, kElements);
  c.allreduce_sum(out.allreduce.data(), kElements);
  out.allreduce_double.assign({1.0 + me, 1e-17 * (me + 1), -3.0});
  c.allreduce_sum(out.allreduce_double.data(), 3);

  std::vector<size_t> counts(static_cast<size_t>(R));
  for (int r = 0; r < R; ++r) counts[r] = static_cast<size_t>(5 + 3 * r);  // uneven, rank 0 smallest
  size_t total = 0, offset = 0;
  for (size_t n : counts) total += n;
  for (int r = 0; r < me; ++r) offset += counts[r];
  const std::vector<float> in = inputs(100 + me, total);
  out.scattered.resize(counts[me]);
  c.reduce_scatter_sum(in.data(), out.scattered.data(), counts);

  const std::vector<float> mine = inputs(200 + me, counts[me]);
  out.gathered.assign(total, -1.0f);
  c.allgather(mine.data(), out.gathered.data(), counts);
  out.gathered_in_place.assign(total, -1.0f);
  std::copy(mine.begin(), mine.end(), out.gathered_in_place.begin() + static_cast<std::ptrdiff_t>(offset));
  c.allgather(out.gathered_in_place.data() + offset, out.gathered_in_place.data(), counts);

  out.broadcast = inputs(300 + me, 17);
  c.broadcast(out.broadcast.data(), 17, R - 1);
  c.barrier();
  return out;
}

// What every rank must get: sums in rank order ((x0 + x1) + x2) + ...
Results expected(int R, int me) {
  Results e;
  e.allreduce = inputs(0, kElements);
  for (int r = 1; r < R; ++r) {
    const std::vector<float> x = inputs(r, kElements);
    for (size_t i = 0; i < kElements; ++i) e.allreduce[i] += x[i];
  }
  e.allreduce_double = {1.0, 1e-17, -3.0};
  for (int r = 1; r < R; ++r) {
    e.allreduce_double[0] += 1.0 + r;
    e.allreduce_double[1] += 1e-17 * (r + 1);
    e.allreduce_double[2] += -3.0;
  }
  std::vector<size_t> counts(static_cast<size_t>(R));
  size_t total = 0, offset = 0;
  for (int r = 0; r < R; ++r) total += counts[r] = static_cast<size_t>(5 + 3 * r);
  for (int r = 0; r < me; ++r) offset += counts[r];
  e.scattered.assign(counts[me], 0.0f);
  for (int r = 0; r < R; ++r) {
    const std::vector<float> in = inputs(100 + r, total);
    for (size_t i = 0; i < counts[me]; ++i) e.scattered[i] = r == 0 ? in[offset + i] : e.scattered[i] + in[offset + i];
  }
  for (int r = 0; r < R; ++r) {
    const std::vector<float> block = inputs(200 + r, counts[r]);
    e.gathered.insert(e.gathered.end(), block.begin(), block.end());
  }
  e.gathered_in_place = e.gathered;
  e.broadcast = inputs(300 + R - 1, 17);
  return e;
}

void expect_bitwise(const Results& a, const Results& b, const std::string& what) {
  EXPECT_EQ(a.allreduce, b.allreduce) << what << ": allreduce_sum (float)";
  EXPECT_EQ(a.allreduce_double, b.allreduce_double) << what << ": allreduce_sum (double)";
  EXPECT_EQ(a.scattered, b.scattered) << what << ": reduce_scatter_sum";
  EXPECT_EQ(a.gathered, b.gathered) << what << ": allgather";
  EXPECT_EQ(a.gathered_in_place, b.gathered_in_place) << what << ": allgather in place";
  EXPECT_EQ(a.broadcast, b.broadcast) << what << ": broadcast";
}

TEST(Collectives, EvenCountsPutTheLargerBlocksFirst) {
  EXPECT_EQ(even_counts(10, 4), (std::vector<size_t>{3, 3, 2, 2}));
  EXPECT_EQ(even_counts(2, 3), (std::vector<size_t>{1, 1, 0}));
  EXPECT_THROW(even_counts(5, 0), Error);
}

TEST(InProcessCollectives, EveryRankGetsTheSumsInRankOrderBitForBit) {
  constexpr int R = 3;
  InProcessGroup group(R, milliseconds(10000));
  std::vector<Results> got(R);
  on_threads(R, [&](int r) { got[r] = exercise(group.member(r)); });
  for (int r = 0; r < R; ++r) expect_bitwise(got[r], expected(R, r), "rank " + std::to_string(r));
}

TEST(InProcessCollectives, AMissingPeerTimesOutInsteadOfHanging) {
  InProcessGroup group(2, milliseconds(200));
  float x = 1.0f;
  const auto start = std::chrono::steady_clock::now();
  try {
    group.member(0).allreduce_sum(&x, 1);  // rank 1 never comes
    FAIL() << "allreduce_sum returned without its peer";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("timed out"), std::string::npos) << e.what();
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
  // The group is broken for good: the late peer fails at once rather than waiting.
  EXPECT_THROW(group.member(1).allreduce_sum(&x, 1), Error);
}

TEST(InProcessCollectives, RanksThatDisagreeOnTheSizeFailOnEveryRank) {
  InProcessGroup group(2, milliseconds(10000));
  int failures = 0;
  std::mutex mu;
  on_threads(2, [&](int r) {
    std::vector<float> v(4 + r);
    try {
      group.member(r).allreduce_sum(v.data(), v.size());
    } catch (const Error&) {
      std::lock_guard lock(mu);
      ++failures;
    }
  });
  EXPECT_EQ(failures, 2);
}

TEST(GlooCollectives, ThreadsOverTcpMatchTheInProcessGroupBitForBit) {
  constexpr int R = 3;  // three ranks: the order of a sum matters
  GlooRendezvous rendezvous = GlooRendezvous::in_memory();
  std::vector<Results> got(R);
  on_threads(R, [&](int r) {
    auto c = connect_gloo(rendezvous, r, R, gloo_options("bitwise", milliseconds(10000)));
    got[r] = exercise(*c);
  });
  for (int r = 0; r < R; ++r) expect_bitwise(got[r], expected(R, r), "Gloo rank " + std::to_string(r));
}

TEST(GlooCollectives, AMissingPeerFailsTheRendezvousWithinItsTimeout) {
  GlooRendezvous rendezvous = GlooRendezvous::in_memory();
  const auto start = std::chrono::steady_clock::now();
  EXPECT_THROW(connect_gloo(rendezvous, 0, 2, gloo_options("alone", milliseconds(300))), Error);
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(10));
}

TEST(GlooCollectives, AFolderRendezvousTakesTheRendezvousOfManyThreadsAtOnce) {
  // The parties of one process connect their groups at the same time through one folder store (a DP x TP run's
  // two tensor ranks each join their data group): 4 groups of 2 ranks, all 8 ranks on threads of this process,
  // every rank's sums right. Gloo's FileStore alone corrupted the heap when two threads wrote keys at once.
  test::ScratchDir dir("moerl-gloo-threads");
  const GlooRendezvous rendezvous = GlooRendezvous::in_folder(dir.path);
  constexpr int kGroups = 4, R = 2;
  std::vector<int> right(kGroups * R, 0);
  on_threads(kGroups * R, [&](int t) {
    const int group = t / R, rank = t % R;
    auto c = connect_gloo(rendezvous, rank, R, gloo_options("group" + std::to_string(group), milliseconds(20000)));
    std::vector<float> v(1000, static_cast<float>(group + rank + 1));
    c->allreduce_sum(v.data(), v.size());
    right[t] = std::all_of(v.begin(), v.end(), [&](float x) { return x == static_cast<float>(2 * group + 3); });
  });
  for (int t = 0; t < kGroups * R; ++t) EXPECT_TRUE(right[t]) << "group " << t / R << " rank " << t % R;
  // Many writers of distinct keys at once: every key then reads back its own value.
  constexpr int kWriters = 16, kKeys = 200;
  on_threads(kWriters, [&](int t) {
    for (int k = 0; k < kKeys; ++k)
      rendezvous.store->set("t" + std::to_string(t) + "k" + std::to_string(k),
                            std::vector<char>(16, static_cast<char>(t)));
  });
  for (int t = 0; t < kWriters; ++t)
    for (int k = 0; k < kKeys; ++k)
      EXPECT_EQ(rendezvous.store->get("t" + std::to_string(t) + "k" + std::to_string(k)),
                std::vector<char>(16, static_cast<char>(t)));
}

TEST(GlooCollectives, TwoProcessesAllReduceOverLoopbackWithADeadline) {
  test::ScratchDir dir("moerl-gloo");
  constexpr size_t n = 100000;  // several hundred kB: more than one TCP segment
  auto values = [](int rank) {
    std::vector<float> v(n);
    for (size_t i = 0; i < n; ++i) v[i] = static_cast<float>(i % 1000) * (rank + 1) + 0.25f * static_cast<float>(rank);
    return v;
  };
  std::vector<float> want = values(0);
  const std::vector<float> other = values(1);
  for (size_t i = 0; i < n; ++i) want[i] += other[i];
  const GlooOptions options = gloo_options("fork", milliseconds(10000));

  const pid_t child = fork();
  ASSERT_GE(child, 0) << std::strerror(errno);
  if (child == 0) {
    // The child only talks Gloo (no OpenMP, no gtest) and leaves with _exit: 0 = the right sums.
    alarm(30);  // a last resort should the parent vanish
    int code = 1;
    try {
      auto c = connect_gloo(GlooRendezvous::in_folder(dir.path), 1, 2, options);
      std::vector<float> v = values(1);
      c->allreduce_sum(v.data(), n);
      code = v == want ? 0 : 2;
    } catch (...) {
      code = 3;
    }
    _exit(code);
  }
  std::vector<float> v = values(0);
  std::string error;
  try {
    auto c = connect_gloo(GlooRendezvous::in_folder(dir.path), 0, 2, options);
    c->allreduce_sum(v.data(), n);
  } catch (const Error& e) {
    error = e.what();
  }
  const std::optional<int> reaped = test::reap_by(child, std::chrono::steady_clock::now() + std::chrono::seconds(20));
  if (!reaped) FAIL() << "the child process did not finish within 20 s";
  const int status = *reaped;
  EXPECT_EQ(error, "");
  EXPECT_TRUE(v == want) << "parent's sums differ";
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0) << "child: 1 = died early, 2 = wrong sums, 3 = Gloo error";
}

}  // namespace
}  // namespace moerl
