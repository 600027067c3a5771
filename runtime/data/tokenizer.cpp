#include "runtime/data/tokenizer.hpp"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <fstream>
#include <sstream>

#include "runtime/error.hpp"
#include "runtime/util/files.hpp"

namespace moerl {
namespace {

// Feeds SentencePiece's trainer the non-empty lines of the texts, in order, without copying the corpus.
class LineIterator : public sentencepiece::SentenceIterator {
 public:
  explicit LineIterator(std::span<const std::string> texts) : texts_(texts) { advance(); }
  bool done() const override { return text_ >= texts_.size(); }
  void Next() override { advance(); }
  const std::string& value() const override { return line_; }
  sentencepiece::util::Status status() const override { return {}; }

 private:
  // Moves to the next non-empty line, from text_/offset_ on.
  void advance() {
    while (text_ < texts_.size()) {
      const std::string& t = texts_[text_];
      if (offset_ >= t.size()) {
        ++text_;
        offset_ = 0;
        continue;
      }
      size_t end = t.find('\n', offset_);
      if (end == std::string::npos) end = t.size();
      line_.assign(t, offset_, end - offset_);
      offset_ = end + 1;
      if (!line_.empty()) return;
    }
  }
  std::span<const std::string> texts_;
  size_t text_ = 0, offset_ = 0;
  std::string line_;
};

void check(const sentencepiece::util::Status& status, const std::string& what) {
  if (!status.ok()) throw Error(what + ": " + status.ToString());
}

}  // namespace

Tokenizer::Tokenizer() : sp_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::train(std::span<const std::string> texts, int vocab_size) {
  const int minimum = kFirstByteId + 256 + 1;
  require(vocab_size >= minimum, "tokenizer: vocab_size " + std::to_string(vocab_size) + " is below the " +
                                     std::to_string(minimum) + " of 4 reserved ids, 256 bytes and one piece");
  std::ostringstream args;
  // identity normalization + kept whitespace + byte fallback: lossless (the LLaMA settings).
  // split_digits: numbers become digit sequences instead of arbitrary merges.
  // num_threads is fixed: it is stored in the model, and a different value would change the bytes.
  // max_sentence_length: longer lines are silently dropped by SentencePiece; Brown's longest paragraph is ~10 KB.
  args << "--model_type=bpe --vocab_size=" << vocab_size
       << " --bos_id=" << kBosId << " --eos_id=" << kEosId << " --pad_id=" << kPadId << " --unk_id=" << kUnkId
       << " --byte_fallback=true --normalization_rule_name=identity --remove_extra_whitespaces=false"
       << " --split_digits=true --allow_whitespace_only_pieces=true --character_coverage=0.9995"
       << " --max_sentence_length=1048576 --num_threads=1 --minloglevel=2";
  LineIterator lines(texts);
  std::string model;
  check(sentencepiece::SentencePieceTrainer::Train(args.str(), &lines, &model),
        "tokenizer: training a " + std::to_string(vocab_size) + "-piece BPE model on " +
            std::to_string(texts.size()) + " texts");
  return from_bytes(std::move(model), "trained tokenizer");
}

Tokenizer Tokenizer::from_bytes(std::string bytes, const std::string& source) {
  Tokenizer t;
  check(t.sp_->LoadFromSerializedProto(bytes), source + ": not a SentencePiece model");
  t.bytes_ = std::move(bytes);
  t.source_ = source;
  t.bos_ = t.sp_->bos_id();
  t.eos_ = t.sp_->eos_id();
  t.unk_ = t.sp_->unk_id();
  t.pad_ = t.sp_->pad_id() >= 0 ? t.sp_->pad_id() : t.eos_;
  require(t.bos_ >= 0 && t.eos_ >= 0, source + ": the tokenizer defines no bos or eos piece");
  return t;
}

Tokenizer Tokenizer::load(const std::filesystem::path& path) {
  const std::filesystem::path file = std::filesystem::is_directory(path) ? path / kFileName : path;
  std::ifstream in(file, std::ios::binary);
  require(in.good(), file.string() + ": cannot open (a SentencePiece tokenizer.model was expected)");
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return from_bytes(std::move(bytes), file.string());
}

void Tokenizer::save(const std::filesystem::path& folder) const {
  std::filesystem::create_directories(folder);
  write_file_durably(folder / kFileName, bytes_);
}

std::vector<int32_t> Tokenizer::encode(std::string_view text) const {
  std::vector<int> ids;
  check(sp_->Encode(text, &ids), source_ + ": encoding");
  return {ids.begin(), ids.end()};
}

std::string Tokenizer::decode(std::span<const int32_t> ids) const {
  const int32_t n = vocab_size();
  std::vector<int> kept;
  kept.reserve(ids.size());
  for (int32_t id : ids) {
    require(id >= 0 && id < n, source_ + ": decoding: token id " + std::to_string(id) + " outside [0, " +
                                   std::to_string(n) + ")");
    if (id != bos_ && id != eos_ && id != pad_) kept.push_back(id);
  }
  std::string text;
  check(sp_->Decode(kept, &text), source_ + ": decoding");
  return text;
}

std::string Tokenizer::piece(int32_t id) const {
  require(id >= 0 && id < vocab_size(), source_ + ": no piece " + std::to_string(id));
  return sp_->IdToPiece(id);
}

int32_t Tokenizer::vocab_size() const { return sp_->GetPieceSize(); }

}  // namespace moerl
