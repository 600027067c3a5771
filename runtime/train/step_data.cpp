#include "runtime/train/step_data.hpp"

#include <cstdio>

#include "runtime/data/bigram.hpp"
#include "runtime/data/jsonl.hpp"
#include "runtime/error.hpp"
#include "runtime/train/run_recipe.hpp"

namespace moerl {
namespace fs = std::filesystem;

RunData prepare_run_data(const Recipe& recipe) {
  fs::create_directories(recipe.out);
  const std::vector<std::string> texts = load_corpus(recipe.data);
  const DocumentSplit split = split_documents(texts.size(), static_cast<size_t>(recipe.data.validation_every));
  require(!split.train.empty() && !split.validation.empty(),
          "the corpus has " + std::to_string(texts.size()) + " documents: too few for a train/validation split");
  const fs::path tok_file = recipe.out / Tokenizer::kFileName;
  Tokenizer tokenizer = [&] {
    if (fs::exists(tok_file)) return Tokenizer::load(tok_file);
    std::vector<std::string> train_texts;
    for (size_t i : split.train) train_texts.push_back(texts[i]);
    Tokenizer t = Tokenizer::train(train_texts, static_cast<int>(recipe.data.vocab_size));
    t.save(recipe.out);
    return t;
  }();
  RunData data{std::move(tokenizer), {}, {}, split.train.size(), split.validation.size()};
  data.train = TokenStream::from_texts(data.tokenizer, texts, split.train);
  data.validation = TokenStream::from_texts(data.tokenizer, texts, split.validation);
  std::fprintf(stderr, "data: %zu train / %zu validation documents, %lld / %lld tokens, vocabulary %d\n",
               split.train.size(), split.validation.size(), static_cast<long long>(data.train.size()),
               static_cast<long long>(data.validation.size()), data.tokenizer.vocab_size());
  return data;
}

std::unique_ptr<StageSource> make_stage_source(const Recipe& recipe, size_t stage_index, const RunData& data) {
  require(stage_index < recipe.stages.size(), recipe.file.string() + ": stage " + std::to_string(stage_index) +
                                                  " does not exist (the recipe has " +
                                                  std::to_string(recipe.stages.size()) + ")");
  const StageSpec& stage = recipe.stages[stage_index];
  auto out = std::make_unique<StageSource>();
  StageSource* s = out.get();
  const uint64_t seed = recipe.seed + 1000 * (stage_index + 1);
  if (stage.kind == "pretrain") {
    s->pretrain = std::make_unique<BatchLoader>(data.train, stage.batch, stage.seq, seed);
    s->source.next = [s] { return s->pretrain->next(); };
    s->source.state = [s] { return s->pretrain->state(); };
    s->source.restore = [s](const LoaderState& st) { s->pretrain->restore(st); };
    s->source.validation = validation_batches(data.validation, stage.batch, stage.seq);
  } else {  // sft: every validation_every-th example held out
    std::vector<SftSequence> fit, held;
    const auto examples = read_sft_jsonl(stage.data);
    for (size_t e = 0; e < examples.size(); ++e)
      (e % static_cast<size_t>(recipe.data.validation_every) == 0 ? held : fit)
          .push_back(encode_sft(data.tokenizer, examples[e]));
    require(static_cast<int64_t>(fit.size()) >= stage.batch,
            stage.data.string() + ": " + std::to_string(fit.size()) + " training examples, fewer than one batch of " +
                std::to_string(stage.batch));
    for (size_t k = 0; k < held.size(); k += static_cast<size_t>(stage.batch)) {
      const size_t n = std::min(held.size() - k, static_cast<size_t>(stage.batch));
      s->source.validation.push_back(make_sft_batch({held.data() + k, n}, data.tokenizer.pad_id(), stage.seq));
    }
    s->sft = std::make_unique<SftLoader>(std::move(fit), stage.batch, stage.seq, data.tokenizer.pad_id(), seed);
    s->source.next = [s] { return s->sft->next(); };
    s->source.state = [s] { return s->sft->state(); };
    s->source.restore = [s](const LoaderState& st) { s->sft->restore(st); };
  }
  if (static_cast<int64_t>(s->source.validation.size()) > stage.eval_batches)
    s->source.validation.resize(static_cast<size_t>(stage.eval_batches));
  return out;
}

double bigram_validation_loss(const RunData& data, const std::vector<Batch>& validation) {
  const BigramModel bigram = BigramModel::train(data.train.tokens(), data.tokenizer.vocab_size());
  return bigram.cross_entropy(validation);
}

}  // namespace moerl
