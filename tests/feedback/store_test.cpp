// The RocksDB stores: durable appends with group commit, time and version order, sampling, retention,
// reopening, and the PairToJudge codec and JSONL export.
#include <gtest/gtest.h>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>
#include <thread>

#include "runtime/error.hpp"
#include "runtime/messages/codec.hpp"
#include "runtime/store/durable_store.hpp"
#include "runtime/store/pair_record.hpp"
#include "tests/feedback/temp_dir.hpp"

namespace moerl::store {
namespace {

std::vector<uint8_t> bytes(const std::string& s) { return std::vector<uint8_t>(s.begin(), s.end()); }
std::string text(std::span<const uint8_t> b) { return std::string(b.begin(), b.end()); }

TEST(DurableStore, KeepsEveryAcknowledgedAppendAcrossAReopenInTimeOrder) {
  test::TempDir dir;
  std::vector<Key> acknowledged;
  {
    DurableStore store(dir.path());
    acknowledged.push_back(store.append(Family::Comparison, 300, bytes("c")));
    acknowledged.push_back(store.append(Family::Comparison, 100, bytes("a")));
    acknowledged.push_back(store.append(Family::Comparison, 200, bytes("b")));
    store.append(Family::Rating, 50, bytes("r"));
  }
  DurableStore store(dir.path());
  EXPECT_EQ(store.count(Family::Comparison), 3u);
  EXPECT_EQ(store.count(Family::Rating), 1u);
  std::string order;
  store.scan(Family::Comparison, 0, UINT64_MAX, [&](const Key&, std::span<const uint8_t> v) {
    order += text(v);
    return true;
  });
  EXPECT_EQ(order, "abc") << "keys sort by time, not by arrival";
  for (const Key& k : acknowledged) EXPECT_TRUE(store.get(Family::Comparison, k).has_value());
  // New sequence numbers continue after the largest stored one, so no key is reused.
  const Key k = store.append(Family::Comparison, 100, bytes("d"));
  EXPECT_GT(k.seq, acknowledged[2].seq);
  order.clear();
  store.scan(Family::Comparison, 100, 201, [&](const Key&, std::span<const uint8_t> v) {
    order += text(v);
    return true;
  });
  EXPECT_EQ(order, "adb") << "equal times keep arrival order; the scan's end is exclusive";
}

TEST(DurableStore, GroupsConcurrentAppendsIntoFewerSyncedCommits) {
  test::TempDir dir;
  DurableStore store(dir.path());
  constexpr int kThreads = 16, kEach = 40;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      for (int i = 0; i < kEach; ++i) store.append(Family::Rating, 1 + t * 1000 + i, bytes("x"));
    });
  for (auto& t : threads) t.join();
  const auto stats = store.stats();
  EXPECT_EQ(stats.records, static_cast<uint64_t>(kThreads * kEach));
  EXPECT_EQ(store.count(Family::Rating), static_cast<uint64_t>(kThreads * kEach));
  // 16 writers each waiting on their own sync: while one fsync runs, the others queue, so a commit carries
  // several. One record per commit would mean no grouping at all.
  EXPECT_LT(stats.commits, stats.records) << "commits " << stats.commits;
}

TEST(DurableStore, IteratesReplayRecordsByPolicyVersionAndErasesTheirIndex) {
  test::TempDir dir;
  DurableStore store(dir.path());
  store.append(Family::Replay, 10, bytes("v3"), 3);
  const Key one = store.append(Family::Replay, 20, bytes("v1"), 1);
  store.append(Family::Replay, 30, bytes("v2"), 2);
  std::string seen;
  store.scan_by_version(1, 3, [&](const Key&, std::span<const uint8_t> v) {
    seen += text(v) + ",";
    return true;
  });
  EXPECT_EQ(seen, "v1,v2,");
  store.erase(Family::Replay, one);
  seen.clear();
  store.scan_by_version(0, 10, [&](const Key&, std::span<const uint8_t> v) {
    seen += text(v) + ",";
    return true;
  });
  EXPECT_EQ(seen, "v2,v3,");
  EXPECT_EQ(store.count(Family::Replay), 2u);
  EXPECT_THROW(store.append(Family::Rating, 1, bytes("x"), 7), Error) << "only replay records have versions";
}

TEST(DurableStore, DropsTheOldestRecordsBeyondTheRetentionLimit) {
  test::TempDir dir;
  StoreOptions options;
  options.max_records[static_cast<int>(Family::Replay)] = 3;
  DurableStore store(dir.path(), options);
  for (int i = 1; i <= 6; ++i) store.append(Family::Replay, static_cast<uint64_t>(i), bytes(std::to_string(i)), i);
  store.erase(Family::Replay, Key{1000, 1});  // a no-op commit: retention runs after the previous one
  EXPECT_EQ(store.count(Family::Replay), 3u);
  std::string kept;
  store.scan(Family::Replay, 0, UINT64_MAX, [&](const Key&, std::span<const uint8_t> v) {
    kept += text(v);
    return true;
  });
  EXPECT_EQ(kept, "456");
}

TEST(DurableStore, SamplesDeterministicallyWithoutReplacement) {
  test::TempDir dir;
  DurableStore store(dir.path());
  for (int i = 0; i < 10; ++i) store.append(Family::Replay, static_cast<uint64_t>(100 + i), bytes(std::to_string(i)));
  const auto a = store.sample(Family::Replay, 4, 7), b = store.sample(Family::Replay, 4, 7);
  ASSERT_EQ(a.size(), 4u);
  EXPECT_EQ(a, b);
  std::set<std::vector<uint8_t>> distinct(a.begin(), a.end());
  EXPECT_EQ(distinct.size(), 4u);
  EXPECT_EQ(store.sample(Family::Replay, 50, 1).size(), 10u);
}

TEST(DurableStore, RefusesASecondOpenOfTheSameFolderWithAMessage) {
  test::TempDir dir;
  DurableStore store(dir.path());
  try {
    DurableStore again(dir.path());
    FAIL() << "a second open must fail";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(dir.path()), std::string::npos) << e.what();
  }
}

TEST(PairRecord, RoundTripsAndRefusesMalformedBytes) {
  PairToJudge p;
  p.pair_id = 9;
  p.prompt.text = "Say hi";
  p.first.text = "hi";
  p.first.ids = {1, 2};
  p.second.text = "hello";
  p.second_policy = {4, 40};
  p.created_ns = 123;
  const auto b = encode(p);
  EXPECT_EQ(decode_pair(b), p);
  auto bad = p;
  bad.pair_id = 0;
  EXPECT_THROW(decode_pair(encode(bad)), Error);
  std::vector<uint8_t> garbage(b.begin(), b.begin() + 16);
  EXPECT_THROW(decode_pair(garbage), Error);
  EXPECT_THROW(decode_pair(std::vector<uint8_t>(7, 0xff)), Error);
}

TEST(PairRecord, ExportsComparisonsAsChosenAndRejected) {
  msg::Comparison c;
  c.prompt.text = "p";
  c.first.text = "worse";
  c.second.text = "better";
  c.choice = msg::Choice::SecondChosen;
  c.annotator = "ann";
  c.timestamp_ns = 5;
  const auto j = nlohmann::json::parse(comparison_jsonl(c));
  EXPECT_EQ(j["prompt"], "p");
  EXPECT_EQ(j["chosen"], "better");
  EXPECT_EQ(j["rejected"], "worse");
  EXPECT_EQ(j["tie"], false);
}

}  // namespace
}  // namespace moerl::store
