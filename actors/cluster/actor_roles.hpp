// Catalog entries for the actor runtime's roles (actors/roles/), so that a driver can have the supervisor
// place them on any node of the cluster instead of spawning them in its own process:
//
//   "roles.data_loader"    config: {"recipe": file, "overrides": [...], "out": run folder}
//   "roles.stage_trainer"  config: the same plus {"vocab_size", "bos_id", "eos_id", "tokenizer_file"} (the
//                          DatasetInfo the data loader described: it fixes the model's vocabulary)
//
// The recipe is read again on the node (same file, same overrides; paths must be valid there: one machine, or
// a shared file system). A role's handle comes back as caf::actor: actor_cast it to data_loader_actor or
// stage_trainer_actor. Their messages (actors::add_message_types) are registered in every cluster process.
// Stage trainers placed this way train on the CPU.
#pragma once
#include <filesystem>
#include <string>
#include <vector>

#include "actors/cluster/catalog.hpp"
#include "runtime/messages/control.hpp"

namespace moerl::cluster {

void add_actor_roles(RoleCatalog& catalog);

// The configs above, as JSON text for RoleSpec::config. Relative paths are made absolute here (the node may
// run in another folder).
std::string data_loader_config(const std::filesystem::path& recipe, const std::vector<std::string>& overrides,
                               const std::filesystem::path& out);
std::string stage_trainer_config(const std::filesystem::path& recipe, const std::vector<std::string>& overrides,
                                 const std::filesystem::path& out, const msg::DatasetInfo& data);

}  // namespace moerl::cluster
