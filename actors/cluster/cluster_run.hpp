// Runs a recipe across the cluster under supervision (`moerl head --run`): the head prepares the run folder
// and tokenizer, then, stage by stage, places a data loader and a stage trainer (train_roles.hpp) where the
// placement says and drives the stage one step at a time: batch(s) from the loader, train(s) on the
// trainer. When a role dies — alone or with its node — the supervisor restarts it elsewhere; the driver then
// asks the trainer where its checkpoint stands and continues from the next step. Requests that time out are
// sent again: batches are pure functions of the step, and the trainer applies each step id once.
//
// Every step's metrics go to <out>/metrics.jsonl once (a step recomputed after a restart is checked against
// its first result, not logged again); the summary goes to <out>/summary.json and is returned.
#pragma once
#include <chrono>
#include <filesystem>
#include <string>
#include <vector>

#include <caf/all.hpp>
#include <nlohmann/json.hpp>

#include "actors/cluster/supervisor.hpp"
#include "runtime/recipe/placement.hpp"

namespace moerl::cluster {

struct ClusterRunOptions {
  std::filesystem::path recipe;
  std::vector<std::string> overrides;   // --set key=value
  std::filesystem::path out;            // empty: the recipe's
  Placement placement;                  // roles "loader" and "trainer"
  std::chrono::milliseconds request_timeout{120000};  // a request without an answer is sent again after this
};

// Blocks until every stage is done; throws moerl::Error when the recipe is invalid or a role fails for good.
nlohmann::json run_on_cluster(caf::actor_system& system, const supervisor_actor& supervisor,
                              const ClusterRunOptions& options);

}  // namespace moerl::cluster
