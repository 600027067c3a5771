// DurableStore: RocksDB column families, the group-commit thread, scans, sampling and retention.
#include "runtime/store/durable_store.hpp"

#include <rocksdb/db.h>
#include <rocksdb/options.h>
#include <rocksdb/write_batch.h>

#include <algorithm>
#include <random>
#include <unordered_map>

#include "runtime/error.hpp"

namespace moerl::store {
namespace {

const char* const kNames[kFamilies] = {"comparison", "rating", "correction", "replay", "pair"};
const char* const kVersionIndex = "replay_by_version";

void put_be64(std::string& out, uint64_t v) {
  for (int i = 7; i >= 0; --i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
uint64_t get_be64(const char* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return v;
}

// Index family keys: 'v' + version + record key -> "" (iteration by version), 'r' + record key -> version
// (so deleting a record finds its index entry without decoding the record).
std::string version_key(uint64_t version, const std::string& key) {
  std::string k = "v";
  put_be64(k, version);
  return k + key;
}
std::string reverse_key(const std::string& key) { return "r" + key; }

void check(const rocksdb::Status& s, const std::string& what) {
  if (!s.ok()) throw Error(what + ": " + s.ToString());
}

std::span<const uint8_t> bytes_of(const rocksdb::Slice& s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}

}  // namespace

const char* family_name(Family f) { return kNames[static_cast<int>(f)]; }

std::string encode_key(const Key& k) {
  std::string out;
  out.reserve(16);
  put_be64(out, k.time_ns);
  put_be64(out, k.seq);
  return out;
}

Key decode_key(std::string_view bytes) {
  require(bytes.size() == 16, "store key: " + std::to_string(bytes.size()) + " bytes, expected 16");
  return Key{get_be64(bytes.data()), get_be64(bytes.data() + 8)};
}

// One queued write: an append (value non-null) or a deletion. A blocking one lives on the caller's stack
// while it waits; an asynchronous one (callback set) owns its value and is deleted by the committer.
struct DurableStore::Pending {
  Family family = Family::Comparison;
  std::string key;
  Key record_key;
  std::span<const uint8_t> value;
  std::vector<uint8_t> owned;
  Done callback;
  std::optional<uint64_t> version;
  bool erase = false;
  bool async = false;  // queued by append_async / erase_async: the committer deletes it
  bool done = false;
  std::string error;
};

DurableStore::DurableStore(const std::string& dir, StoreOptions options) : dir_(dir), options_(options) {
  rocksdb::DBOptions db_options;
  db_options.create_if_missing = true;
  db_options.create_missing_column_families = true;
  // Recovery stops at the first corrupt WAL record: everything acknowledged (synced) before it is kept.
  db_options.wal_recovery_mode = rocksdb::WALRecoveryMode::kPointInTimeRecovery;
  db_options.max_background_jobs = 2;
  std::vector<rocksdb::ColumnFamilyDescriptor> families;
  families.emplace_back(rocksdb::kDefaultColumnFamilyName, rocksdb::ColumnFamilyOptions());
  for (const char* name : kNames) families.emplace_back(name, rocksdb::ColumnFamilyOptions());
  families.emplace_back(kVersionIndex, rocksdb::ColumnFamilyOptions());
  rocksdb::DB* raw = nullptr;
  check(rocksdb::DB::Open(db_options, dir, families, &handles_, &raw), "feedback store " + dir);
  db_.reset(raw);

  // Count the records and find the largest sequence number, so new keys stay unique.
  uint64_t max_seq = 0;
  for (int f = 0; f < kFamilies; ++f) {
    uint64_t n = 0;
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), handles_[f + 1]));
    for (it->SeekToFirst(); it->Valid(); it->Next()) {
      ++n;
      if (it->key().size() == 16) max_seq = std::max(max_seq, get_be64(it->key().data() + 8));
    }
    check(it->status(), "feedback store " + dir + ": reading " + kNames[f]);
    counts_[f] = n;
  }
  next_seq_ = max_seq + 1;
  committer_ = std::thread([this] { commit_loop(); });
}

DurableStore::~DurableStore() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  queued_.notify_all();
  committer_.join();
  for (auto* h : handles_) db_->DestroyColumnFamilyHandle(h);
  db_->Close();
}

Key DurableStore::append(Family f, uint64_t time_ns, std::span<const uint8_t> value, std::optional<uint64_t> version) {
  require(time_ns > 0, std::string("store ") + family_name(f) + ": time must be > 0");
  require(!version || f == Family::Replay, std::string("store ") + family_name(f) + ": only replay records have a version index");
  const Key key{time_ns, next_seq_.fetch_add(1)};
  Pending p;
  p.family = f;
  p.key = encode_key(key);
  p.value = value;
  p.version = version;
  std::unique_lock lock(mutex_);
  require(!stopping_, "store " + dir_ + ": closed");
  queue_.push_back(&p);
  queued_.notify_one();
  done_.wait(lock, [&] { return p.done; });
  if (!p.error.empty()) throw Error("store " + dir_ + ": " + p.error);
  return key;
}

Key DurableStore::append_async(Family f, uint64_t time_ns, std::vector<uint8_t> value, Done done,
                               std::optional<uint64_t> version) {
  require(time_ns > 0, std::string("store ") + family_name(f) + ": time must be > 0");
  require(!version || f == Family::Replay, std::string("store ") + family_name(f) + ": only replay records have a version index");
  require(static_cast<bool>(done), std::string("store ") + family_name(f) + ": append_async needs a callback");
  const Key key{time_ns, next_seq_.fetch_add(1)};
  auto p = std::make_unique<Pending>();
  p->family = f;
  p->key = encode_key(key);
  p->record_key = key;
  p->owned = std::move(value);
  p->value = p->owned;
  p->version = version;
  p->callback = std::move(done);
  p->async = true;
  {
    std::lock_guard lock(mutex_);
    require(!stopping_, "store " + dir_ + ": closed");
    queue_.push_back(p.release());
  }
  queued_.notify_one();
  return key;
}

void DurableStore::erase_async(Family f, const Key& k, Done done) {
  auto p = std::make_unique<Pending>();
  p->family = f;
  p->key = encode_key(k);
  p->record_key = k;
  p->erase = true;
  p->async = true;
  p->callback = std::move(done);
  {
    std::lock_guard lock(mutex_);
    require(!stopping_, "store " + dir_ + ": closed");
    queue_.push_back(p.release());
  }
  queued_.notify_one();
}

void DurableStore::erase(Family f, const Key& k) {
  Pending p;
  p.family = f;
  p.key = encode_key(k);
  p.erase = true;
  std::unique_lock lock(mutex_);
  queue_.push_back(&p);
  queued_.notify_one();
  done_.wait(lock, [&] { return p.done; });
  if (!p.error.empty()) throw Error("store " + dir_ + ": " + p.error);
}

void DurableStore::commit_loop() {
  rocksdb::WriteOptions write_options;
  write_options.sync = options_.sync;
  std::vector<Pending*> batch, asynchronous;
  for (;;) {
    {
      std::unique_lock lock(mutex_);
      queued_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping, nothing left
      const size_t n = std::min(queue_.size(), options_.max_batch);
      batch.assign(queue_.begin(), queue_.begin() + static_cast<ptrdiff_t>(n));
      queue_.erase(queue_.begin(), queue_.begin() + static_cast<ptrdiff_t>(n));
    }
    rocksdb::WriteBatch wb;
    int64_t delta[kFamilies] = {};
    // Appends earlier in this batch, by family + key: an erase of one of them cannot see it in the DB yet.
    std::unordered_map<std::string, Pending*> appended;
    for (Pending* p : batch) {
      auto* h = handle(p->family);
      const std::string id = static_cast<char>(p->family) + p->key;
      if (p->erase) {
        if (const auto it = appended.find(id); it != appended.end()) {
          wb.Delete(h, p->key);
          --delta[static_cast<int>(p->family)];
          if (it->second->version) {
            wb.Delete(version_index(), reverse_key(p->key));
            wb.Delete(version_index(), version_key(*it->second->version, p->key));
          }
          appended.erase(it);
          continue;
        }
        std::string value;
        if (!db_->Get(rocksdb::ReadOptions(), h, p->key, &value).ok()) continue;  // already gone
        wb.Delete(h, p->key);
        --delta[static_cast<int>(p->family)];
        std::string version;
        if (db_->Get(rocksdb::ReadOptions(), version_index(), reverse_key(p->key), &version).ok() && version.size() == 8) {
          wb.Delete(version_index(), reverse_key(p->key));
          wb.Delete(version_index(), version_key(get_be64(version.data()), p->key));
        }
      } else {
        wb.Put(h, p->key, rocksdb::Slice(reinterpret_cast<const char*>(p->value.data()), p->value.size()));
        ++delta[static_cast<int>(p->family)];
        appended[id] = p;
        if (p->version) {
          std::string v;
          put_be64(v, *p->version);
          wb.Put(version_index(), version_key(*p->version, p->key), "");
          wb.Put(version_index(), reverse_key(p->key), v);
        }
      }
    }
    const auto status = db_->Write(write_options, &wb);
    {
      std::lock_guard lock(mutex_);
      for (Pending* p : batch) {
        if (!status.ok()) p->error = "write failed: " + status.ToString();
        if (p->async) asynchronous.push_back(p);  // a blocking one may be gone once `done` is seen
        p->done = true;
      }
      if (status.ok()) {
        ++stats_.commits;
        stats_.records += batch.size();
        for (int f = 0; f < kFamilies; ++f) counts_[f] += static_cast<uint64_t>(delta[f]);
      }
    }
    done_.notify_all();
    // Callbacks outside the lock: the blocking appenders above are already on their way.
    for (Pending* p : asynchronous) {
      try {
        if (p->callback) p->callback(p->record_key, p->error);
      } catch (...) {  // a callback's failure must not stop the committer (and with it every writer)
      }
      delete p;
    }
    asynchronous.clear();
    for (int f = 0; f < kFamilies; ++f)
      if (options_.max_records[f] && counts_[f] > options_.max_records[f]) enforce_retention(static_cast<Family>(f));
  }
}

void DurableStore::enforce_retention(Family f) {
  const uint64_t excess = counts_[static_cast<int>(f)] - options_.max_records[static_cast<int>(f)];
  rocksdb::WriteBatch wb;
  uint64_t n = 0;
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), handle(f)));
  for (it->SeekToFirst(); it->Valid() && n < excess; it->Next(), ++n) {
    const std::string key = it->key().ToString();
    wb.Delete(handle(f), key);
    std::string version;
    if (db_->Get(rocksdb::ReadOptions(), version_index(), reverse_key(key), &version).ok() && version.size() == 8) {
      wb.Delete(version_index(), reverse_key(key));
      wb.Delete(version_index(), version_key(get_be64(version.data()), key));
    }
  }
  // Not synced: a lost deletion only keeps a record longer; the next synced commit makes it durable.
  if (db_->Write(rocksdb::WriteOptions(), &wb).ok()) counts_[static_cast<int>(f)] -= n;
}

std::optional<std::vector<uint8_t>> DurableStore::get(Family f, const Key& k) const {
  std::string value;
  const auto s = db_->Get(rocksdb::ReadOptions(), handle(f), encode_key(k), &value);
  if (s.IsNotFound()) return std::nullopt;
  check(s, "store " + dir_ + ": reading " + family_name(f));
  return std::vector<uint8_t>(value.begin(), value.end());
}

void DurableStore::scan(Family f, uint64_t from_ns, uint64_t to_ns,
                        const std::function<bool(const Key&, std::span<const uint8_t>)>& fn) const {
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), handle(f)));
  for (it->Seek(encode_key(Key{from_ns, 0})); it->Valid(); it->Next()) {
    const Key k = decode_key(std::string_view(it->key().data(), it->key().size()));
    if (k.time_ns >= to_ns) break;
    if (!fn(k, bytes_of(it->value()))) return;
  }
  check(it->status(), "store " + dir_ + ": scanning " + family_name(f));
}

void DurableStore::scan_by_version(uint64_t from_version, uint64_t to_version,
                                   const std::function<bool(const Key&, std::span<const uint8_t>)>& fn) const {
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), version_index()));
  std::string start = "v";
  put_be64(start, from_version);
  for (it->Seek(start); it->Valid(); it->Next()) {
    const auto k = it->key();
    if (k.size() != 25 || k[0] != 'v' || get_be64(k.data() + 1) >= to_version) break;
    std::string value;
    if (!db_->Get(rocksdb::ReadOptions(), handle(Family::Replay), rocksdb::Slice(k.data() + 9, 16), &value).ok()) continue;
    if (!fn(decode_key(std::string_view(k.data() + 9, 16)), {reinterpret_cast<const uint8_t*>(value.data()), value.size()}))
      return;
  }
  check(it->status(), "store " + dir_ + ": scanning replay_by_version");
}

std::vector<Key> DurableStore::keys(Family f) const {
  std::vector<Key> out;
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), handle(f)));
  for (it->SeekToFirst(); it->Valid(); it->Next())
    out.push_back(decode_key(std::string_view(it->key().data(), it->key().size())));
  check(it->status(), "store " + dir_ + ": listing " + family_name(f));
  return out;
}

std::vector<std::vector<uint8_t>> DurableStore::sample(Family f, size_t count, uint64_t seed) const {
  auto index = keys(f);
  std::mt19937_64 rng(seed);
  const size_t n = std::min(count, index.size());
  std::vector<std::vector<uint8_t>> out;
  for (size_t i = 0; i < n; ++i) {
    std::swap(index[i], index[i + rng() % (index.size() - i)]);
    if (auto v = get(f, index[i])) out.push_back(std::move(*v));
  }
  return out;
}

StoreStats DurableStore::stats() const {
  std::lock_guard lock(mutex_);
  return stats_;
}

}  // namespace moerl::store
