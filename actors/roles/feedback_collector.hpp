// Feedback collector: keeps what people submit — comparisons, ratings, corrections — and the pairs queued for
// them to judge, in a RocksDB store (runtime/store/: one column family per record kind, keys sorting by time).
// Every write is answered only once it is durable (the WAL synced): the actor queues it with
// DurableStore::append_async and answers from the group commit's callback, so it keeps serving while the WAL
// syncs and concurrent writes share one fsync. A collector spawned again on the same folder (after a crash or
// a kill) holds every record it acknowledged.
//
// Duplicate deliveries are ignored: a record whose bytes equal a held record's (a resent message), or a pair
// whose pair id is already held, is not stored again; its answer waits until the first copy is durable.
//
// The HTTP endpoint (runtime/feedback/, `moerl feedback serve`, the preferences stage of `moerl run`) sits in
// front of it: its FeedbackService hands every record to an ActorRecordSink (feedback_sink.hpp), which sends
// them here in batches (submit with a vector) and answers each HTTP request from this actor's reply. The
// service reads the same store object (pairs at construction, export, counts): spawn the collector on a store
// the caller shares, queue pairs first, then open the endpoint.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "actors/envelope.hpp"
#include "runtime/store/durable_store.hpp"

namespace moerl::actors {

using queue_atom = caf::atom_constant<caf::atom("queue")>;
using next_atom = caf::atom_constant<caf::atom("next")>;
// Internal: the store's commit callback tells the actor that write `seq` is durable ("" or RocksDB's error).
using committed_atom = caf::atom_constant<caf::atom("committed")>;

// The kind of a PairToJudge Envelope (store::encode / store::decode_pair, schemas/feedback.capnp).
inline constexpr const char* kPairToJudgeKind = "PairToJudge";

using feedback_collector_actor = caf::typed_actor<
    // A Comparison, Rating or Correction (schemaVersion checked). Reply, once durable: the number of records of
    // that kind now held.
    caf::replies_to<submit_atom, Envelope>::with<uint64_t>,
    // Submissions in a batch (the HTTP endpoint's), each a Comparison, Rating or Correction as above, all checked
    // before any is written (one malformed: the whole batch is refused). Reply, once every one is durable: their
    // keys, in order (a duplicate delivery: the held copy's key). A failed write fails the batch.
    caf::replies_to<submit_atom, std::vector<Envelope>>::with<std::vector<RecordKey>>,
    // Records of kind ("Comparison", "Rating", "Correction", "PairToJudge") from index `offset`, at most
    // `limit`, in time order (a submission's key carries its arrival time, a pair's its createdNs). Only
    // durable records are listed. Reply: the records.
    caf::replies_to<list_atom, std::string, uint64_t, uint64_t>::with<std::vector<Envelope>>,
    // A PairToJudge to queue for judging (pairId > 0 and createdNs > 0: the codec's rules; its key's time is
    // createdNs). Reply, once durable: its pair id.
    caf::replies_to<queue_atom, Envelope>::with<uint64_t>,
    // The first durable pair whose id is larger than `after` (0: the first pair), for an annotator walking the
    // queue. Reply: that PairToJudge, or no Envelope when there is none.
    caf::replies_to<next_atom, uint64_t>::with<std::vector<Envelope>>,
    // Internal (sent by the store's committer thread): write `seq` is durable, or failed with the message.
    caf::reacts_to<committed_atom, uint64_t, std::string>,
    // Internal: the writes `seqs` of one batch are durable, or (any of them) failed with the message.
    caf::reacts_to<committed_atom, std::vector<uint64_t>, std::string>>;

// On the store in `db_dir` (created if missing). `db_dir` empty: a private store in a fresh temporary folder,
// removed when the actor ends. Throws moerl::Error when the store cannot be opened (e.g. still held by a
// collector that has not ended yet).
feedback_collector_actor spawn_feedback_collector(caf::actor_system& system, std::string name = "feedback/0",
                                                  std::string db_dir = "");
// On a store the caller shares (e.g. with a FeedbackService in the same process: RocksDB lets one process
// open a folder once).
feedback_collector_actor spawn_feedback_collector(caf::actor_system& system, std::shared_ptr<store::DurableStore> store,
                                                  std::string name = "feedback/0");

}  // namespace moerl::actors
