// Replay buffer: scored rollouts waiting for a policy update. Keeps validated ReplayRecords in memory (RocksDB
// comes later), at most `capacity`, dropping the oldest; a record whose rollout (request id, sample index) is
// already held is a duplicate delivery and is ignored (rollouts are delivered at least once).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "actors/envelope.hpp"

namespace moerl::actors {

using replay_buffer_actor = caf::typed_actor<
    // A ReplayRecord. Reply: records held.
    caf::replies_to<put_atom, Envelope>::with<uint64_t>,
    // `count` records drawn uniformly without replacement (all of them when fewer are held), in the order
    // drawn; the same `seed` on the same contents draws the same records. Reply: ReplayRecords.
    caf::replies_to<sample_atom, uint32_t, uint64_t>::with<std::vector<Envelope>>,
    // Reply: records held.
    caf::replies_to<size_atom>::with<uint64_t>>;

replay_buffer_actor spawn_replay_buffer(caf::actor_system& system, size_t capacity, std::string name = "replay_buffer/0");

}  // namespace moerl::actors
