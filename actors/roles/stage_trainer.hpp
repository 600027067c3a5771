// Stage trainer: owns a model and its optimizer on one device — today the whole model (one pipeline stage),
// moerl::Model + AdamW through a TrainingBackend — and applies training steps, evaluations and checkpoints
// the driver commands. Step ids make a repeated step a no-op that answers the recorded result, so a retried
// command is never applied twice. Runs on its own thread (a step keeps a core busy for its whole length).
#pragma once
#include <filesystem>
#include <functional>
#include <memory>
#include <string>

#include "actors/envelope.hpp"
#include "runtime/parallel/party.hpp"
#include "runtime/recipe/recipe.hpp"
#include "runtime/train/backend.hpp"

namespace moerl::actors {

using stage_trainer_actor = caf::typed_actor<
    // Reply: the device the model trains on ("cpu", "cuda").
    caf::replies_to<describe_atom>::with<std::string>,
    // Starts stage `stage` (index into the recipe's stages) with a fresh optimizer. With a checkpoint
    // folder, loads its weights, and with the flag also its optimizer state (resuming mid-stage). Reply:
    // the steps the stage has already applied (the checkpoint's step, or 0).
    caf::replies_to<begin_atom, uint32_t, std::string, bool>::with<uint64_t>,
    // TrainStep (exactly one micro-batch for now; the learning rate must be the stage's schedule at that
    // step) for step last + 1: forward, backward, AdamW, router-bias update. A step already applied answers
    // its recorded TrainStepResult without training. Reply: TrainStepResult.
    caf::replies_to<train_atom, Envelope>::with<Envelope>,
    // EvalRequest: mean cross-entropy of the current weights over its batches, no update. Reply: EvalResult.
    caf::replies_to<evaluate_atom, Envelope>::with<Envelope>,
    // CheckpointRequest: writes the training checkpoint (runtime/train/checkpoint.hpp: weights, optimizer,
    // tokenizer, trainer_state.json) of the last applied step, which must be the request's. Reply:
    // CheckpointManifest of the folder (CRC-32C of each file).
    caf::replies_to<checkpoint_atom, Envelope>::with<Envelope>>;

// Makes the training backend of a recipe from the host model holding the initial weights (which outlives
// it). Empty: the CPU backend (make_cpu_backend).
using BackendChooser = std::function<std::unique_ptr<TrainingBackend>(const Recipe& recipe, Model& host)>;

struct StageTrainerSetup {
  Recipe recipe;
  ModelConfig model;                     // the recipe's, with the tokenizer's vocabulary and special ids
  std::filesystem::path tokenizer_file;  // copied into checkpoints
  BackendChooser backend;
};

// The CheckpointManifest of a written checkpoint folder: each file's size and CRC-32C, by name.
msg::CheckpointManifest checkpoint_manifest(const std::filesystem::path& folder, const msg::StepId& step);

// The model is built and initialised from recipe.seed when the first stage begins (errors become replies).
stage_trainer_actor spawn_stage_trainer(caf::actor_system& system, StageTrainerSetup setup,
                                        std::string name = "stage_trainer/0");

// One party of a parallel run (runtime/parallel/party.hpp: a pipeline stage, an expert shard, or a data x
// tensor rank) behind the stage trainer's protocol. The driver sends every command to every party of the group;
// they run it together on their own threads, exchanging tensors on the group's channels and collectives, and
// answer the same result (a checkpoint's manifest comes from party 0, or in a run over processes from each
// process's first party; the others list no files). Weights start from Model::init_random(recipe.seed), as the
// single stage trainer's. A party that fails aborts the group, so its peers fail at once instead of waiting.
struct PartyTrainerSetup {
  Recipe recipe;
  ModelConfig model;
  std::filesystem::path tokenizer_file;
  std::shared_ptr<PartyGroup> group;
  int party = 0;
};
stage_trainer_actor spawn_party_trainer(caf::actor_system& system, PartyTrainerSetup setup);

}  // namespace moerl::actors
