// DurableStore::erase_async: a deletion queued behind an append still in flight removes it (in the same
// WriteBatch when they are committed together), and an append queued after the deletion is acknowledged only
// once the deletion is durable too.
#include <gtest/gtest.h>

#include <condition_variable>
#include <mutex>

#include "runtime/store/durable_store.hpp"
#include "tests/feedback/temp_dir.hpp"

namespace moerl::store {
namespace {

std::vector<uint8_t> bytes(uint8_t v) { return std::vector<uint8_t>(8, v); }

TEST(DurableStoreEraseAsync, DeletesARecordWhoseAppendIsStillQueuedAndIsDurableBeforeTheNextAck) {
  test::TempDir dir;
  Key a, b;
  {
    DurableStore s(dir.path());
    std::mutex m;
    std::condition_variable cv;
    int acked = 0;
    std::string errors;
    const auto done = [&](const Key&, const std::string& error) {
      std::lock_guard lock(m);
      errors += error;
      ++acked;
      cv.notify_all();
    };
    // Many rounds: some land append and erase in one batch, some in two.
    for (int round = 0; round < 50; ++round) {
      a = s.append_async(Family::Replay, 1000 + 2 * round, bytes(1), done, uint64_t{3});
      s.erase_async(Family::Replay, a);
      b = s.append_async(Family::Replay, 1001 + 2 * round, bytes(2), done, uint64_t{3});
      std::unique_lock lock(m);
      ASSERT_TRUE(cv.wait_for(lock, std::chrono::seconds(30), [&] { return acked == 2 * (round + 1); }));
      // b is acknowledged: a's deletion was committed in the same or an earlier batch.
      EXPECT_FALSE(s.get(Family::Replay, a)) << round;
      EXPECT_TRUE(s.get(Family::Replay, b)) << round;
      EXPECT_EQ(s.count(Family::Replay), static_cast<uint64_t>(round + 1)) << round;
    }
    EXPECT_EQ(errors, "");
    // The version index lost the erased records' entries too.
    uint64_t indexed = 0;
    s.scan_by_version(3, 4, [&](const Key&, std::span<const uint8_t> v) {
      EXPECT_EQ(v[0], 2);
      ++indexed;
      return true;
    });
    EXPECT_EQ(indexed, 50u);
  }
  DurableStore reopened(dir.path());
  EXPECT_EQ(reopened.count(Family::Replay), 50u);
  EXPECT_FALSE(reopened.get(Family::Replay, a));
  EXPECT_TRUE(reopened.get(Family::Replay, b));
}

}  // namespace
}  // namespace moerl::store
