// Driver: runs a recipe. It reads the recipe, spawns and monitors the data loader and the stage trainer,
// and runs the stages step by step — TrainStep commands with step ids and the schedule's learning rates,
// validation, checkpoints (runtime/train/checkpoint.hpp files, the same as run_recipe's), resume from them —
// writing metrics.jsonl and summary.json like run_recipe. With the recipe's parallelism > 1 the stage
// trainer is a group of party actors (pipeline stages and expert shards, or data x tensor ranks;
// runtime/parallel/party.hpp) that every command goes to. A child that dies is restarted with all the others
// from the stage's last checkpoint (see on_child_down in driver.cpp); after 3 restarts, or with no checkpoint
// to restart from, the run fails naming the child.
#pragma once
#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "actors/envelope.hpp"
#include "actors/roles/stage_trainer.hpp"

namespace moerl::actors {

using driver_actor = caf::typed_actor<
    // Runs every stage of the recipe file (YAML) with "dotted.path=value" overrides applied; a non-empty
    // third argument replaces the recipe's run folder. One run per driver. Reply: summary.json's text and
    // the run folder. A bad recipe (file:line: field), a failed command or a dead child answers an error
    // naming the file or the actor.
    caf::replies_to<run_atom, std::string, std::vector<std::string>, std::string>::with<std::string, std::string>,
    // The handle of a child by name ("data_loader/0", "stage_trainer/0"); an invalid handle when there is
    // none (not spawned yet, or the run is over).
    caf::replies_to<lookup_atom, std::string>::with<caf::actor>>;

// A run spread over processes (`moerl run --processes N --process I --rendezvous DIR`): every process runs
// the same driver on the same recipe and data, its parallel group holding only its own parties (PartyProcesses,
// placed by spread_parties: whole stages or whole replicas per process). Process 0 writes the checkpoints,
// metrics.jsonl and summary.json into the run folder, which every process must share (they read the stages'
// checkpoints from it); process I > 0 writes its metrics.jsonl and summary.json into <out>/process-I/. The
// rendezvous folder must be fresh for each launch. A party that dies fails the run: restarts across processes
// are not implemented yet.
struct DriverProcesses {
  int process = 0;
  int processes = 1;
  std::filesystem::path rendezvous;
};

// `backend` picks the stage trainer's training backend (empty: the CPU's).
driver_actor spawn_driver(caf::actor_system& system, BackendChooser backend = {}, DriverProcesses processes = {});

struct ActorRunResult {
  nlohmann::json summary;
  std::filesystem::path out;  // the run folder
};
// `moerl run`: an actor system in this process, a driver, the recipe run to its end. Throws moerl::Error with
// the driver's message when the run fails.
ActorRunResult run_recipe_with_actors(const std::filesystem::path& recipe_file, const std::vector<std::string>& overrides,
                                      const std::string& out = {}, BackendChooser backend = {},
                                      DriverProcesses processes = {});

}  // namespace moerl::actors
