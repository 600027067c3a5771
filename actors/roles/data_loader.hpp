// Data loader: owns a recipe's dataset — the corpus, its train/validation split, the tokenizer (trained on
// the train split and saved into the run folder, or loaded from there), the token streams — and the
// resumable batch loader of the stage being run. Runs on its own thread (tokenization uses OpenMP).
#pragma once
#include <string>

#include "actors/envelope.hpp"
#include "runtime/recipe/recipe.hpp"

namespace moerl::actors {

using data_loader_actor = caf::typed_actor<
    // Loads the corpus and the tokenizer (once; later calls answer from memory). Reply: DatasetInfo.
    caf::replies_to<describe_atom>::with<Envelope>,
    // Opens stage `stage` (index into the recipe's stages) at its first batch. Reply: StageData (its
    // validation batches, the bigram baseline of a pretraining stage, the starting position).
    caf::replies_to<open_atom, uint32_t>::with<Envelope>,
    // The batch of step `step` of the open stage: step = last + 1 advances the loader, step = last serves
    // the last batch again (a retried step gets the same data); any other step is refused. Reply: TokenBatch.
    caf::replies_to<batch_atom, uint64_t>::with<Envelope>,
    // Reply: the LoaderPosition after the last batch served (what a checkpoint records).
    caf::replies_to<position_atom>::with<Envelope>,
    // Moves the open stage's loader to a LoaderPosition (from a checkpoint); its step.run must be the
    // stage's. Reply: the LoaderPosition now held.
    caf::replies_to<restore_atom, Envelope>::with<Envelope>>;

// The StepId.run of a recipe's stage: "<recipe name>/<stage name>" (step ids restart with each stage).
std::string stage_run_id(const Recipe& recipe, size_t stage);

// `name` ("data_loader/0") names the actor in its errors.
data_loader_actor spawn_data_loader(caf::actor_system& system, const Recipe& recipe,
                                    std::string name = "data_loader/0");

}  // namespace moerl::actors
