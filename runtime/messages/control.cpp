// encode/decode of schemas/control.capnp, with the framing, traversal limits and error conversion of
// codec.hpp's kinds. Nested batches are whole TokenBatch messages, read back with decode_token_batch.
#include "runtime/messages/control.hpp"

#include <capnp/message.h>
#include <capnp/serialize.h>
#include <kj/exception.h>
#include <kj/io.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "runtime/error.hpp"
#include "runtime/messages/flat.hpp"
#include "schemas/control.capnp.h"

namespace moerl::msg {
namespace {

std::string num(uint64_t v) { return std::to_string(v); }

// Saturating word counts (as limits.cpp): absurd limits give an unbounded traversal, never a wrapped one.
uint64_t add(uint64_t a, uint64_t b) {
  uint64_t r;
  return __builtin_add_overflow(a, b, &r) ? std::numeric_limits<uint64_t>::max() : r;
}
uint64_t mul(uint64_t a, uint64_t b) {
  uint64_t r;
  return __builtin_mul_overflow(a, b, &r) ? std::numeric_limits<uint64_t>::max() : r;
}
constexpr uint64_t kStruct = 16;  // words of one struct of these schemas, at most (checked below)
static_assert(wire::LoaderPosition::_capnpPrivate::dataWordSize + wire::LoaderPosition::_capnpPrivate::pointerCount <=
                  kStruct &&
              wire::DatasetInfo::_capnpPrivate::dataWordSize + wire::DatasetInfo::_capnpPrivate::pointerCount <=
                  kStruct &&
              wire::StageData::_capnpPrivate::dataWordSize + wire::StageData::_capnpPrivate::pointerCount <= kStruct);
uint64_t text_words(uint64_t bytes) { return add(bytes, 8) / 8; }
uint64_t step_id_words(const DecodeLimits& l) { return add(kStruct, text_words(l.max_name_bytes)); }
// The largest list of encoded TokenBatch messages: a pointer and a message header per batch, each batch's
// struct and step id, and the shared token budget twice (ids and labels), odd lengths rounded up.
uint64_t batch_list_words(const DecodeLimits& l) {
  const uint64_t per_batch = add(4, add(kStruct, step_id_words(l)));
  return add(add(1, mul(l.max_micro_batches, per_batch)), add(l.max_batch_tokens, l.max_micro_batches));
}

capnp::Text::Reader text_of(const std::string& s) { return capnp::Text::Reader(s.data(), s.size()); }

std::string read_text(capnp::Text::Reader t, uint64_t max_bytes, const std::string& field, bool nonempty) {
  if (t.size() > max_bytes) throw Error(field + ": " + num(t.size()) + " bytes, at most " + num(max_bytes) + " allowed");
  if (nonempty && t.size() == 0) throw Error(field + ": empty, expected a non-empty text");
  return std::string(t.cStr(), t.size());
}

void fill(wire::StepId::Builder b, const StepId& s) {
  b.setRun(text_of(s.run));
  b.setStep(s.step);
}
StepId read_step(wire::StepId::Reader r, const DecodeLimits& l, const std::string& field) {
  return StepId{read_text(r.getRun(), l.max_name_bytes, field + ".run", false), r.getStep()};
}

void fill_batches(capnp::List<capnp::Data>::Builder list, const std::vector<TokenBatch>& batches) {
  for (size_t i = 0; i < batches.size(); ++i) {
    const std::vector<uint8_t> bytes = encode(batches[i]);
    list.set(static_cast<unsigned>(i), kj::arrayPtr(bytes.data(), bytes.size()));
  }
}
// At least one batch (unless allow_empty), at most max_micro_batches, sharing max_batch_tokens.
std::vector<TokenBatch> read_batches(capnp::List<capnp::Data>::Reader list, const DecodeLimits& l,
                                     const std::string& field, bool allow_empty) {
  if (list.size() == 0 && !allow_empty) throw Error(field + ": empty, expected at least one batch");
  if (list.size() > l.max_micro_batches)
    throw Error(field + ": " + num(list.size()) + " batches, at most " + num(l.max_micro_batches) + " allowed");
  std::vector<TokenBatch> out;
  DecodeLimits each = l;
  for (unsigned i = 0; i < list.size(); ++i) {
    const auto bytes = list[i];
    const std::string where = field + "[" + num(i) + "]";
    try {
      out.push_back(decode_token_batch(std::span<const uint8_t>(bytes.begin(), bytes.size()), each));
    } catch (const Error& e) {
      throw Error(where + ": " + e.what());
    }
    each.max_batch_tokens -= uint64_t{out.back().batch} * out.back().seq;
  }
  return out;
}

template <class Wire, class Fill>
std::vector<uint8_t> build(const char* kind, size_t payload_bytes, Fill fill_root) {
  try {
    capnp::MallocMessageBuilder message(static_cast<unsigned>(std::min<size_t>(64 + payload_bytes / 8, 1u << 28)));
    fill_root(message.initRoot<Wire>());
    return flat_bytes(message);
  } catch (const kj::Exception& e) {
    throw Error(std::string(kind) + ": cannot encode (" + e.getDescription().cStr() + ")");
  }
}

// Frames `bytes` as one message (8-byte aligned copy when needed), reads the root with `read` under
// `traversal_words`, and turns every Cap'n Proto failure into Error naming the kind.
template <class Wire, class Read>
auto decode_as(const char* kind, std::span<const uint8_t> bytes, const DecodeLimits& limits, uint64_t traversal_words,
               Read read) {
  const std::string name(kind);
  if (bytes.empty() || bytes.size() % sizeof(capnp::word) != 0)
    throw Error(name + ": " + num(bytes.size()) + " bytes, expected a non-empty multiple of 8 (one Cap'n Proto message)");
  kj::Array<capnp::word> aligned = kj::heapArray<capnp::word>(bytes.size() / sizeof(capnp::word));
  std::memcpy(aligned.begin(), bytes.data(), bytes.size());
  capnp::ReaderOptions options;
  options.traversalLimitInWords = traversal_words;
  options.nestingLimit = limits.nesting_limit;
  try {
    capnp::FlatArrayMessageReader reader(aligned, options);
    if (reader.getEnd() != aligned.end())
      throw Error(name + ": " + num(static_cast<uint64_t>(aligned.end() - reader.getEnd()) * 8) +
                  " bytes after the end of the message, expected exactly one message");
    return read(reader.getRoot<Wire>(), name);
  } catch (const kj::Exception& e) {
    throw Error(name + ": malformed Cap'n Proto message (" + std::string(e.getDescription().cStr()) + ")");
  }
}

void check_finite_nonnegative(double v, const std::string& field) {
  if (!std::isfinite(v) || v < 0) throw Error(field + ": " + std::to_string(v) + ", expected a finite number >= 0");
}

void fill(wire::LoaderPosition::Builder b, const LoaderPosition& x) {
  b.setSeed(x.seed);
  b.setEpoch(x.epoch);
  b.setCursor(x.cursor);
  fill(b.initStep(), x.step);
}
LoaderPosition read_position(wire::LoaderPosition::Reader r, const DecodeLimits& l, const std::string& p) {
  LoaderPosition x{r.getSeed(), r.getEpoch(), r.getCursor(), read_step(r.getStep(), l, p + ".step")};
  if (x.epoch < 0) throw Error(p + ".epoch: " + std::to_string(x.epoch) + ", expected >= 0");
  if (x.cursor < 0) throw Error(p + ".cursor: " + std::to_string(x.cursor) + ", expected >= 0");
  return x;
}

}  // namespace

std::vector<uint8_t> encode(const LoaderPosition& x) {
  return build<wire::LoaderPosition>(kLoaderPositionKind, x.step.run.size(), [&](auto b) { fill(b, x); });
}
std::vector<uint8_t> encode(const DatasetInfo& x) {
  return build<wire::DatasetInfo>(kDatasetInfoKind, x.tokenizer_file.size(), [&](wire::DatasetInfo::Builder b) {
    b.setTokenizerFile(text_of(x.tokenizer_file));
    b.setVocabSize(x.vocab_size);
    b.setBosId(x.bos_id);
    b.setEosId(x.eos_id);
    b.setPadId(x.pad_id);
    b.setTrainTokens(x.train_tokens);
    b.setValidationTokens(x.validation_tokens);
  });
}
std::vector<uint8_t> encode(const StageData& x) {
  size_t payload = 0;
  for (const TokenBatch& b : x.validation) payload += 8 * b.ids.size() + 256;
  return build<wire::StageData>(kStageDataKind, payload, [&](wire::StageData::Builder b) {
    b.setStage(x.stage);
    fill(b.initPosition(), x.position);
    fill_batches(b.initValidation(static_cast<unsigned>(x.validation.size())), x.validation);
    b.setHasBigram(x.has_bigram);
    b.setBigramValidationLoss(x.bigram_validation_loss);
  });
}
std::vector<uint8_t> encode(const EvalRequest& x) {
  size_t payload = 0;
  for (const TokenBatch& b : x.batches) payload += 8 * b.ids.size() + 256;
  return build<wire::EvalRequest>(kEvalRequestKind, payload, [&](wire::EvalRequest::Builder b) {
    fill(b.initStep(), x.step);
    fill_batches(b.initBatches(static_cast<unsigned>(x.batches.size())), x.batches);
  });
}
std::vector<uint8_t> encode(const EvalResult& x) {
  return build<wire::EvalResult>(kEvalResultKind, x.step.run.size(), [&](wire::EvalResult::Builder b) {
    fill(b.initStep(), x.step);
    b.setLoss(x.loss);
    b.setTokens(x.tokens);
  });
}
std::vector<uint8_t> encode(const CheckpointRequest& x) {
  return build<wire::CheckpointRequest>(kCheckpointRequestKind, x.folder.size() + x.trainer_state.size(),
                                        [&](wire::CheckpointRequest::Builder b) {
                                          b.setFolder(text_of(x.folder));
                                          fill(b.initStep(), x.step);
                                          b.setTrainerState(text_of(x.trainer_state));
                                        });
}
std::vector<uint8_t> encode(const RewardScore& x) {
  return build<wire::RewardScore>(kRewardScoreKind, x.scorer.size(), [&](wire::RewardScore::Builder b) {
    b.setRequestId(x.request_id);
    b.setSampleIndex(x.sample_index);
    b.setScore(x.score);
    b.setScorer(text_of(x.scorer));
  });
}

LoaderPosition decode_loader_position(std::span<const uint8_t> bytes, const DecodeLimits& l) {
  return decode_as<wire::LoaderPosition>(kLoaderPositionKind, bytes, l, add(kStruct, step_id_words(l)),
                                         [&](wire::LoaderPosition::Reader r, const std::string& p) {
                                           return read_position(r, l, p);
                                         });
}

DatasetInfo decode_dataset_info(std::span<const uint8_t> bytes, const DecodeLimits& l) {
  return decode_as<wire::DatasetInfo>(
      kDatasetInfoKind, bytes, l, add(kStruct, text_words(l.max_name_bytes)),
      [&](wire::DatasetInfo::Reader r, const std::string& p) {
        DatasetInfo x;
        x.tokenizer_file = read_text(r.getTokenizerFile(), l.max_name_bytes, p + ".tokenizerFile", true);
        x.vocab_size = r.getVocabSize();
        if (x.vocab_size == 0) throw Error(p + ".vocabSize: 0, expected at least one piece");
        if (l.vocab > 0 && x.vocab_size > l.vocab)
          throw Error(p + ".vocabSize: " + num(x.vocab_size) + ", at most " + std::to_string(l.vocab) + " allowed");
        x.bos_id = r.getBosId();
        x.eos_id = r.getEosId();
        x.pad_id = r.getPadId();
        const std::pair<int32_t, const char*> ids[] = {{x.bos_id, "bosId"}, {x.eos_id, "eosId"}, {x.pad_id, "padId"}};
        for (const auto& [id, field] : ids)
          if (id < 0 || static_cast<uint32_t>(id) >= x.vocab_size)
            throw Error(p + "." + field + ": " + std::to_string(id) + ", expected an id in [0, " + num(x.vocab_size) +
                        ")");
        x.train_tokens = r.getTrainTokens();
        x.validation_tokens = r.getValidationTokens();
        return x;
      });
}

StageData decode_stage_data(std::span<const uint8_t> bytes, const DecodeLimits& l) {
  const uint64_t words = add(add(2 * kStruct, step_id_words(l)), batch_list_words(l));
  return decode_as<wire::StageData>(kStageDataKind, bytes, l, words, [&](wire::StageData::Reader r, const std::string& p) {
    StageData x;
    x.stage = r.getStage();
    x.position = read_position(r.getPosition(), l, p + ".position");
    x.validation = read_batches(r.getValidation(), l, p + ".validation", true);
    x.has_bigram = r.getHasBigram();
    x.bigram_validation_loss = r.getBigramValidationLoss();
    if (x.has_bigram) check_finite_nonnegative(x.bigram_validation_loss, p + ".bigramValidationLoss");
    return x;
  });
}

EvalRequest decode_eval_request(std::span<const uint8_t> bytes, const DecodeLimits& l) {
  const uint64_t words = add(add(kStruct, step_id_words(l)), batch_list_words(l));
  return decode_as<wire::EvalRequest>(kEvalRequestKind, bytes, l, words,
                                      [&](wire::EvalRequest::Reader r, const std::string& p) {
                                        EvalRequest x;
                                        x.step = read_step(r.getStep(), l, p + ".step");
                                        x.batches = read_batches(r.getBatches(), l, p + ".batches", false);
                                        return x;
                                      });
}

EvalResult decode_eval_result(std::span<const uint8_t> bytes, const DecodeLimits& l) {
  return decode_as<wire::EvalResult>(kEvalResultKind, bytes, l, add(kStruct, step_id_words(l)),
                                     [&](wire::EvalResult::Reader r, const std::string& p) {
                                       EvalResult x{read_step(r.getStep(), l, p + ".step"), r.getLoss(), r.getTokens()};
                                       check_finite_nonnegative(x.loss, p + ".loss");
                                       return x;
                                     });
}

CheckpointRequest decode_checkpoint_request(std::span<const uint8_t> bytes, const DecodeLimits& l) {
  const uint64_t words = add(add(kStruct, text_words(l.max_name_bytes)), add(step_id_words(l), text_words(l.max_text_bytes)));
  return decode_as<wire::CheckpointRequest>(
      kCheckpointRequestKind, bytes, l, words, [&](wire::CheckpointRequest::Reader r, const std::string& p) {
        CheckpointRequest x;
        x.folder = read_text(r.getFolder(), l.max_name_bytes, p + ".folder", true);
        x.step = read_step(r.getStep(), l, p + ".step");
        if (x.step.run.empty()) throw Error(p + ".step.run: empty, expected the run's name");
        x.trainer_state = read_text(r.getTrainerState(), l.max_text_bytes, p + ".trainerState", true);
        return x;
      });
}

RewardScore decode_reward_score(std::span<const uint8_t> bytes, const DecodeLimits& l) {
  return decode_as<wire::RewardScore>(kRewardScoreKind, bytes, l, add(kStruct, text_words(l.max_name_bytes)),
                                      [&](wire::RewardScore::Reader r, const std::string& p) {
                                        RewardScore x{r.getRequestId(), r.getSampleIndex(), r.getScore(),
                                                      read_text(r.getScorer(), l.max_name_bytes, p + ".scorer", false)};
                                        if (!std::isfinite(x.score))
                                          throw Error(p + ".score: " + std::to_string(x.score) + ", expected a finite number");
                                        return x;
                                      });
}

}  // namespace moerl::msg
