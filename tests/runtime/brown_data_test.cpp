// The data pipeline on the real Brown Corpus; opt-in (it reads 6 MB and trains a tokenizer, ~1 min):
//   scripts/fetch-brown.sh data/brown && MOERL_BROWN_DIR=data/brown moerl_tests --gtest_filter='BrownCorpus.*'
// Prints the corpus and token counts, the tokenizer's training time and the bigram baseline. It writes
// MOERL_BROWN_DIR/tokenizer.model, or, when that file exists, requires training to reproduce it byte for byte.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>

#include "runtime/data/bigram.hpp"
#include "runtime/data/jsonl.hpp"
#include "runtime/data/loader.hpp"
#include "runtime/data/tokenizer.hpp"

namespace moerl {

TEST(BrownCorpus, TrainsATokenizerAndABigramBaselineOnTheRealCorpus) {
  const char* dir_env = std::getenv("MOERL_BROWN_DIR");
  if (dir_env == nullptr) GTEST_SKIP() << "set MOERL_BROWN_DIR to a folder holding brown.jsonl";
  const std::filesystem::path dir = dir_env;
  const std::vector<std::string> texts = read_text_jsonl(dir / "brown.jsonl");
  ASSERT_EQ(texts.size(), 500u);
  const DocumentSplit split = split_documents(texts.size(), 20);
  std::vector<std::string> train_texts;
  for (size_t i : split.train) train_texts.push_back(texts[i]);

  const auto t0 = std::chrono::steady_clock::now();
  const Tokenizer tokenizer = Tokenizer::train(train_texts, 2000);
  const double train_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const std::filesystem::path saved = dir / Tokenizer::kFileName;
  if (std::filesystem::exists(saved))
    EXPECT_EQ(Tokenizer::load(saved).bytes(), tokenizer.bytes()) << "training is not deterministic";
  else
    tokenizer.save(dir);

  const auto t1 = std::chrono::steady_clock::now();
  const TokenStream train = TokenStream::from_texts(tokenizer, texts, split.train);
  const TokenStream valid = TokenStream::from_texts(tokenizer, texts, split.validation);
  const double encode_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
  for (size_t i : split.validation) ASSERT_EQ(tokenizer.decode(tokenizer.encode(texts[i])), texts[i]);

  const BigramModel bigram = BigramModel::train(train.tokens(), tokenizer.vocab_size());
  const std::vector<Batch> windows = validation_batches(valid, 8, 128);
  const double ce = bigram.cross_entropy(windows);
  // The quickstart recipe evaluates the first eval_batches (16) of these batches.
  const std::vector<Batch> first16(windows.begin(), windows.begin() + 16);
  const double ce16 = bigram.cross_entropy(first16);
  const double uniform = std::log(2000.0);
  std::printf("brown: %zu documents (%zu train, %zu validation); tokens %lld train, %lld validation\n",
              texts.size(), split.train.size(), split.validation.size(), static_cast<long long>(train.size()),
              static_cast<long long>(valid.size()));
  std::printf("tokenizer: vocab %d, trained in %.2f s, encoded all in %.2f s\n", tokenizer.vocab_size(), train_s,
              encode_s);
  std::printf("bigram (add-one): validation cross-entropy %.4f nats over %zu windows of 128 (first 16 batches of 8: "
              "%.4f); uniform %.4f\n",
              ce, (valid.size() - 1) / 128 * size_t{1}, ce16, uniform);
  // A bigram on 1.5 M tokens must beat the uniform guess by a wide margin (it is 5.0 vs 7.6 nats here).
  EXPECT_LT(ce, uniform - 1.0);
}

}  // namespace moerl
