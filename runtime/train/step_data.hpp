// A recipe's data, prepared once and served stage by stage: the pieces of run_recipe's data path that a
// data-loader actor owns (corpus, document split, tokenizer, token streams, one resumable loader per stage).
// Same inputs, same functions, same order as run_recipe: the batches are identical to the direct path's.
#pragma once
#include <cstddef>
#include <memory>
#include <vector>

#include "runtime/data/loader.hpp"
#include "runtime/data/tokenizer.hpp"
#include "runtime/recipe/recipe.hpp"
#include "runtime/train/trainer.hpp"

namespace moerl {

struct RunData {
  Tokenizer tokenizer;  // trained on the train split, saved into recipe.out (or loaded from there on resume)
  TokenStream train, validation;
  size_t train_documents = 0, validation_documents = 0;
};

// Reads the corpus (load_corpus), splits it by document, trains or loads recipe.out/tokenizer.model and
// encodes both splits; prints run_recipe's "data: ..." line on stderr. Throws moerl::Error like run_recipe.
RunData prepare_run_data(const Recipe& recipe);

// The batches of one stage: a pretraining window loader or an SFT loader seeded with
// recipe.seed + 1000 * (stage_index + 1), and at most eval_batches validation batches. `source`'s functions
// point into this object (not movable) and into `data`, which must outlive it.
struct StageSource {
  BatchSource source;
  std::unique_ptr<BatchLoader> pretrain;
  std::unique_ptr<SftLoader> sft;
};
std::unique_ptr<StageSource> make_stage_source(const Recipe& recipe, size_t stage_index, const RunData& data);

// run_recipe's baseline for a pretraining stage: the add-one bigram model of the train stream, scored on
// `validation`, nats.
double bigram_validation_loss(const RunData& data, const std::vector<Batch>& validation);

}  // namespace moerl
