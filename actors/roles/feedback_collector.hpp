// Feedback collector: receives what people submit on the feedback page — comparisons, ratings, corrections —
// validates each record and keeps it. In memory for now; the HTTP endpoint, the page and the RocksDB store
// come with the feedback issue.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "actors/envelope.hpp"

namespace moerl::actors {

using feedback_collector_actor = caf::typed_actor<
    // A Comparison, Rating or Correction (schemaVersion checked). Reply: the number of records of that kind
    // now held.
    caf::replies_to<submit_atom, Envelope>::with<uint64_t>,
    // Records of kind ("Comparison", "Rating", "Correction") from index `offset`, at most `limit`, in arrival
    // order. Reply: the records.
    caf::replies_to<list_atom, std::string, uint64_t, uint64_t>::with<std::vector<Envelope>>>;

feedback_collector_actor spawn_feedback_collector(caf::actor_system& system, std::string name = "feedback/0");

}  // namespace moerl::actors
