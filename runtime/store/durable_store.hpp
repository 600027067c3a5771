// A durable record store on RocksDB: one column family per record kind, values are Cap'n Proto messages
// (each carries its schemaVersion), keys sort by time. append() returns only once the record is in the
// write-ahead log and the log is fsync'ed; concurrent appends share one fsync (group commit): a committer
// thread takes every append queued while the previous sync ran and writes them as one WriteBatch.
//
// Key layout (16 bytes, big-endian so bytewise order is numeric order):
//   [0, 8)  time, nanoseconds since the Unix epoch (UTC), as uint64 (records before 1970 are refused)
//   [8, 16) sequence number, unique in the store, increasing in append order (ties on time keep arrival order)
// The replay family has an index family "replay_by_version" keyed by policy version (8 bytes) + the record key.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

namespace rocksdb {
class DB;
class ColumnFamilyHandle;
}  // namespace rocksdb

namespace moerl::store {

enum class Family : uint8_t { Comparison, Rating, Correction, Replay, Pair };
inline constexpr int kFamilies = 5;
const char* family_name(Family f);  // the column family's name: "comparison", ...

struct Key {
  uint64_t time_ns = 0;
  uint64_t seq = 0;
  bool operator==(const Key&) const = default;
  auto operator<=>(const Key&) const = default;
};
std::string encode_key(const Key& k);               // 16 bytes
Key decode_key(std::string_view bytes);             // throws moerl::Error unless 16 bytes

struct StoreOptions {
  // fsync the WAL before acknowledging. false only for tests that do not test durability (the fuzz test).
  bool sync = true;
  // Records kept per family; 0 = unlimited. When exceeded, the oldest (by key) are deleted after a commit.
  uint64_t max_records[kFamilies] = {0, 0, 0, 0, 0};
  // Appends written by one WriteBatch at most (one fsync); bounds the latency a burst adds to each.
  size_t max_batch = 8192;
};

struct StoreStats {
  uint64_t commits = 0;   // WriteBatches written (= fsyncs when sync)
  uint64_t records = 0;   // records appended through them
};

class DurableStore {
 public:
  // Opens (creating if needed) the store in `dir`, with every column family. Throws moerl::Error naming
  // the folder and RocksDB's status on failure (e.g. another process holds the lock).
  DurableStore(const std::string& dir, StoreOptions options = {});
  ~DurableStore();
  DurableStore(const DurableStore&) = delete;
  DurableStore& operator=(const DurableStore&) = delete;

  // Appends `value` under a new key with time `time_ns` (> 0); `version` adds an index entry (Replay only).
  // Blocks until durable; thread-safe. Throws moerl::Error when RocksDB refuses the write.
  Key append(Family f, uint64_t time_ns, std::span<const uint8_t> value, std::optional<uint64_t> version = {});

  // The same without blocking: returns the record's key at once and calls done(key, "") on the committer
  // thread once the record is durable (its WAL synced), or done(key, message) when RocksDB refused the
  // write. `done` must be quick (it delays the next commit) and must not call back into this store.
  using Done = std::function<void(const Key&, const std::string& error)>;
  Key append_async(Family f, uint64_t time_ns, std::vector<uint8_t> value, Done done,
                   std::optional<uint64_t> version = {});

  std::optional<std::vector<uint8_t>> get(Family f, const Key& k) const;
  // Calls fn(key, value) for each record with from <= key.time_ns < to, in key order; stops when fn returns false.
  void scan(Family f, uint64_t from_ns, uint64_t to_ns,
            const std::function<bool(const Key&, std::span<const uint8_t>)>& fn) const;
  // Replay records with from <= policy version < to, in (version, key) order.
  void scan_by_version(uint64_t from_version, uint64_t to_version,
                       const std::function<bool(const Key&, std::span<const uint8_t>)>& fn) const;
  // Every key of the family, in order.
  std::vector<Key> keys(Family f) const;
  // `count` records drawn uniformly without replacement (all when fewer are held), in the order drawn;
  // the same seed on the same contents draws the same records (std::mt19937_64, partial Fisher-Yates).
  std::vector<std::vector<uint8_t>> sample(Family f, size_t count, uint64_t seed) const;
  // Deletes one record (and its version index entry); durable like append.
  void erase(Family f, const Key& k);
  // The same without blocking: queued behind every append and erase before it (so it may delete a record
  // whose append is still queued), committed in the same or a later WriteBatch; `done` (may be empty) is
  // called like append_async's. An append queued after it is durable only once the deletion is: an actor
  // that drops its oldest record before appending a new one acknowledges both with the append's callback.
  void erase_async(Family f, const Key& k, Done done = {});

  uint64_t count(Family f) const { return counts_[static_cast<int>(f)].load(); }
  StoreStats stats() const;
  const std::string& dir() const { return dir_; }

 private:
  struct Pending;
  void commit_loop();
  void enforce_retention(Family f);
  rocksdb::ColumnFamilyHandle* handle(Family f) const { return handles_[static_cast<size_t>(f) + 1]; }
  rocksdb::ColumnFamilyHandle* version_index() const { return handles_.back(); }

  std::string dir_;
  StoreOptions options_;
  std::unique_ptr<rocksdb::DB> db_;
  std::vector<rocksdb::ColumnFamilyHandle*> handles_;  // default, the kFamilies families, the version index
  std::atomic<uint64_t> counts_[kFamilies];
  std::atomic<uint64_t> next_seq_{1};

  mutable std::mutex mutex_;
  std::condition_variable queued_, done_;
  std::vector<Pending*> queue_;
  bool stopping_ = false;
  StoreStats stats_;
  std::thread committer_;
};

}  // namespace moerl::store
