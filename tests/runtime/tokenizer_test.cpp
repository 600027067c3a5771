// The SentencePiece tokenizer: reserved ids, lossless round trip, deterministic training, checkpoint
// files, and the token stream built with it.
#include "runtime/data/tokenizer.hpp"

#include <gtest/gtest.h>

#include <filesystem>
#include <random>
#include <unistd.h>

#include "runtime/data/loader.hpp"
#include "runtime/error.hpp"

namespace moerl {
namespace {

// 300 lines of 12 words from a 16-word vocabulary (a fixed generator: the same corpus everywhere).
std::vector<std::string> small_corpus() {
  const char* words[] = {"the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog",
                         "and", "cat",   "runs",  "far", "away",  "from", "home", "1961"};
  std::mt19937 rng(1);
  std::vector<std::string> texts;
  for (int doc = 0; doc < 20; ++doc) {
    std::string text;
    for (int line = 0; line < 15; ++line) {
      for (int w = 0; w < 12; ++w) text += std::string(w ? " " : "") + words[rng() % 16];
      text += ".\n";
    }
    texts.push_back(text);
  }
  return texts;
}

const Tokenizer& small_tokenizer() {
  static const Tokenizer t = Tokenizer::train(small_corpus(), 360);
  return t;
}

}  // namespace

TEST(Tokenizer, ReservesBosEosPadUnkThenTheBytes) {
  const Tokenizer& t = small_tokenizer();
  EXPECT_EQ(t.vocab_size(), 360);
  EXPECT_EQ(t.bos_id(), 0);
  EXPECT_EQ(t.eos_id(), 1);
  EXPECT_EQ(t.pad_id(), 2);
  EXPECT_EQ(t.unk_id(), 3);
  EXPECT_EQ(t.piece(0), "<s>");
  EXPECT_EQ(t.piece(1), "</s>");
  EXPECT_EQ(t.piece(2), "<pad>");
  EXPECT_EQ(t.piece(Tokenizer::kFirstByteId), "<0x00>");
  EXPECT_EQ(t.piece(Tokenizer::kFirstByteId + 255), "<0xFF>");
  // Learned pieces: whole frequent words.
  EXPECT_EQ(t.encode("the fox").size(), 2u);
}

TEST(Tokenizer, RoundTripsAnyTextThroughEncodeAndDecode) {
  const Tokenizer& t = small_tokenizer();
  for (const std::string text : {"the quick brown fox.", "  two leading spaces, trailing ", "tab\there\nnew line",
                                 "unseen: Z\xC3\xA9zette \xF0\x9F\x99\x82 {}", "2024-11-28", ""}) {
    const std::vector<int32_t> ids = t.encode(text);
    EXPECT_EQ(t.decode(ids), text);
    for (int32_t id : ids) EXPECT_NE(id, t.unk_id()) << text;  // byte fallback: never <unk>
  }
  // Digits are split one by one (split_digits), whatever training saw.
  EXPECT_EQ(t.encode("1961").size(), 5u);  // "▁" + 4 digits
  // bos/eos/pad decode to nothing.
  std::vector<int32_t> ids = t.encode("the dog");
  ids.insert(ids.begin(), t.bos_id());
  ids.push_back(t.eos_id());
  ids.push_back(t.pad_id());
  EXPECT_EQ(t.decode(ids), "the dog");
}

TEST(Tokenizer, TrainsToTheSameModelBytesFromTheSameTexts) {
  const Tokenizer again = Tokenizer::train(small_corpus(), 360);
  EXPECT_EQ(again.bytes(), small_tokenizer().bytes());
  std::vector<std::string> other = small_corpus();
  other.pop_back();
  EXPECT_NE(Tokenizer::train(other, 360).bytes(), small_tokenizer().bytes());
}

TEST(Tokenizer, SavesToAndLoadsFromACheckpointFolder) {
  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / ("moerl-tokenizer-" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  small_tokenizer().save(dir / "step-10");
  const Tokenizer from_folder = Tokenizer::load(dir / "step-10");
  const Tokenizer from_file = Tokenizer::load(dir / "step-10" / "tokenizer.model");
  EXPECT_EQ(from_folder.bytes(), small_tokenizer().bytes());
  EXPECT_EQ(from_file.encode("lazy cat runs home"), small_tokenizer().encode("lazy cat runs home"));
  EXPECT_EQ(from_folder.pad_id(), 2);
  std::filesystem::remove_all(dir);
}

TEST(Tokenizer, ExplainsWhatIsWrong) {
  try {
    Tokenizer::load("/nonexistent/ckpt/tokenizer.model");
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent/ckpt/tokenizer.model: cannot open"), std::string::npos);
  }
  EXPECT_THROW(Tokenizer::from_bytes("not a model", "junk.model"), Error);
  EXPECT_THROW(Tokenizer::train(small_corpus(), 100), Error);     // below 4 + 256 + 1
  EXPECT_THROW(Tokenizer::train(small_corpus(), 50000), Error);   // more pieces than the texts can make
  EXPECT_THROW(small_tokenizer().decode(std::vector<int32_t>{360}), Error);
}

TEST(TokenStream, WrapsEachDocumentInBosAndEosInTheGivenOrder) {
  const Tokenizer& t = small_tokenizer();
  const std::vector<std::string> docs = {"the dog", "far away", "home"};
  const std::vector<size_t> which = {2, 0};
  TokenStream s = TokenStream::from_texts(t, docs, which);
  EXPECT_EQ(s.documents(), 2);
  std::vector<int32_t> expected = {t.bos_id()};
  for (int32_t id : t.encode("home")) expected.push_back(id);
  expected.push_back(t.eos_id());
  expected.push_back(t.bos_id());
  for (int32_t id : t.encode("the dog")) expected.push_back(id);
  expected.push_back(t.eos_id());
  EXPECT_EQ(std::vector<int32_t>(s.tokens().begin(), s.tokens().end()), expected);
  EXPECT_EQ(TokenStream::from_texts(t, docs).documents(), 3);
  EXPECT_EQ(TokenStream::from_texts(t, docs, std::vector<size_t>{}).size(), 0);  // an empty split is empty
}

TEST(Sft, EncodesBosPromptResponseEosAndCountsThePrompt) {
  const Tokenizer& t = small_tokenizer();
  SftSequence s = encode_sft(t, {"the dog", "runs far"});
  const size_t prompt = t.encode("the dog").size(), response = t.encode("runs far").size();
  ASSERT_EQ(s.tokens.size(), 1 + prompt + response + 1);
  EXPECT_EQ(s.prompt_length, static_cast<int64_t>(1 + prompt));
  EXPECT_EQ(s.tokens.front(), t.bos_id());
  EXPECT_EQ(s.tokens.back(), t.eos_id());
  EXPECT_EQ(t.decode(std::span(s.tokens).subspan(s.prompt_length)), "runs far");
}

}  // namespace moerl
