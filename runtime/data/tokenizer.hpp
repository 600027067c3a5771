// Tokenizer: a SentencePiece BPE model, trained here from texts, stored as `tokenizer.model` (the
// SentencePiece protobuf) in a checkpoint folder.
//
// Reserved ids of the models train() makes (they match ModelConfig's bos_token_id 0 / eos_token_id 1, the
// DeepSeek-V3 convention):
//   0 <s> (bos)   1 </s> (eos)   2 <pad>   3 <unk>   4..259 the bytes <0x00>..<0xFF>   260.. learned pieces
// Byte fallback is on, so any UTF-8 text encodes without <unk>. Normalization is the identity and
// whitespace is kept as is, so decode(encode(text)) == text for valid UTF-8 (newlines and tabs become
// byte pieces unless training saw them).
#pragma once
#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace moerl {

class Tokenizer {
 public:
  static constexpr int32_t kBosId = 0, kEosId = 1, kPadId = 2, kUnkId = 3;
  static constexpr int32_t kFirstByteId = 4;  // <0x00>; 256 byte pieces follow
  static constexpr const char* kFileName = "tokenizer.model";

  // Trains a BPE model of exactly `vocab_size` pieces (reserved ids and 256 bytes included) on `texts`.
  // Each text is cut at '\n' into training sentences; the same texts give the same model bytes.
  // Throws Error when the texts are too small for vocab_size (SentencePiece's message says the limit).
  static Tokenizer train(std::span<const std::string> texts, int vocab_size);
  // Reads `path`, or `path`/tokenizer.model when `path` is a folder. The model must define bos and eos.
  static Tokenizer load(const std::filesystem::path& path);
  // A model from its serialized bytes; `source` names it in errors.
  static Tokenizer from_bytes(std::string bytes, const std::string& source);

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // Writes `folder`/tokenizer.model (creating the folder; via a temporary file and a rename).
  void save(const std::filesystem::path& folder) const;
  // The serialized model: what save() writes.
  const std::string& bytes() const { return bytes_; }

  // Token ids without bos/eos.
  std::vector<int32_t> encode(std::string_view text) const;
  // Text of ids; bos, eos and pad decode to nothing.
  std::string decode(std::span<const int32_t> ids) const;
  std::string piece(int32_t id) const;  // e.g. "▁the", "<0x0A>"

  int32_t vocab_size() const;
  int32_t bos_id() const { return bos_; }
  int32_t eos_id() const { return eos_; }
  int32_t pad_id() const { return pad_; }  // the model's <pad>; eos where the model defines none
  int32_t unk_id() const { return unk_; }

 private:
  Tokenizer();
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
  std::string bytes_;
  std::string source_;
  int32_t bos_ = -1, eos_ = -1, pad_ = -1, unk_ = -1;
};

}  // namespace moerl
