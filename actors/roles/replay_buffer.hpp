// Replay buffer: scored rollouts (ReplayRecord: prompt, response tokens, log-probs, rewards, advantages, policy
// version) waiting for a policy update, kept in a RocksDB store (runtime/store/: the "replay" column family,
// keys sorting by arrival time, indexed by policy version). A put is answered only once durable (the WAL
// synced, through the store's group commit; the actor keeps serving meanwhile). A buffer spawned again on the
// same folder (after a crash or a kill) holds every record it acknowledged.
//
// At most `capacity` records are held: a put beyond it deletes the oldest in the same or an earlier commit than
// its own, so its answer means both are durable. A record whose rollout (request id, sample index) is already
// held is a duplicate delivery (rollouts are delivered at least once) and is ignored; its answer waits until
// the first copy is durable.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "actors/envelope.hpp"
#include "actors/roles/feedback_collector.hpp"  // committed_atom

namespace moerl::actors {

using version_atom = caf::atom_constant<caf::atom("version")>;

using replay_buffer_actor = caf::typed_actor<
    // A ReplayRecord. Reply, once durable: records held when it was accepted (a duplicate: the first copy's).
    caf::replies_to<put_atom, Envelope>::with<uint64_t>,
    // `count` durable records drawn uniformly without replacement (all of them when fewer are held), in the
    // order drawn; the same `seed` on the same contents draws the same records, also after a respawn.
    // Reply: ReplayRecords.
    caf::replies_to<sample_atom, uint32_t, uint64_t>::with<std::vector<Envelope>>,
    // Reply: records held.
    caf::replies_to<size_atom>::with<uint64_t>,
    // Durable records that arrived in [from_ns, to_ns) (Unix epoch ns), at most `limit`, oldest first.
    caf::replies_to<list_atom, uint64_t, uint64_t, uint64_t>::with<std::vector<Envelope>>,
    // Durable records of policy versions in [from, to), at most `limit`, by (version, arrival).
    caf::replies_to<version_atom, uint64_t, uint64_t, uint64_t>::with<std::vector<Envelope>>,
    // Internal (sent by the store's committer thread): write `seq` is durable, or failed with the message.
    caf::reacts_to<committed_atom, uint64_t, std::string>>;

// On the store in `db_dir` (created if missing; what it holds beyond `capacity` is dropped, oldest first).
// `db_dir` empty: a private store in a fresh temporary folder, removed when the actor ends. Throws moerl::Error
// when the store cannot be opened (e.g. still held by a buffer that has not ended yet).
replay_buffer_actor spawn_replay_buffer(caf::actor_system& system, size_t capacity, std::string name = "replay_buffer/0",
                                        std::string db_dir = "");

}  // namespace moerl::actors
