// Names of the message kinds and the Cap'n Proto traversal limit of each, derived from DecodeLimits: the
// words of the largest legitimate message of that kind. Cap'n Proto charges a struct's data and pointer
// sections and a list's content (plus one tag word for a list of structs) each time a reader is obtained.
#include <limits>

#include "runtime/messages/codec.hpp"
#include "runtime/messages/wire.hpp"

namespace moerl::msg {
namespace {

// Saturating arithmetic: absurd limits give an unbounded traversal, never a wrapped-around tiny one.
uint64_t add(uint64_t a, uint64_t b) {
  uint64_t r;
  return __builtin_add_overflow(a, b, &r) ? std::numeric_limits<uint64_t>::max() : r;
}
uint64_t mul(uint64_t a, uint64_t b) {
  uint64_t r;
  return __builtin_mul_overflow(a, b, &r) ? std::numeric_limits<uint64_t>::max() : r;
}

// Words charged for one struct of our schemas (data section + pointer section), an upper bound checked below
// against the generated code (the largest: TrainStepResult with 7 data words and 2 pointers).
constexpr uint64_t kStruct = 16;
template <class... S>
constexpr bool structs_fit() {
  return ((S::_capnpPrivate::dataWordSize + S::_capnpPrivate::pointerCount <= kStruct) && ...);
}
static_assert(structs_fit<wire::StepId, wire::PolicyVersion, wire::TensorRef, wire::ActorError, wire::TokenBatch,
                          wire::TrainStep, wire::ExpertLoad, wire::TrainStepResult, wire::FileEntry,
                          wire::CheckpointManifest, wire::SamplingParams, wire::GenerationRequest, wire::Rollout,
                          wire::Utterance, wire::Comparison, wire::Rating, wire::Correction, wire::ReplayRecord>(),
              "a struct outgrew kStruct: raise it");
uint64_t text_words(uint64_t bytes) { return add(bytes, 8) / 8; }  // NUL terminator, rounded up
uint64_t data_words(uint64_t bytes) { return add(bytes, 7) / 8; }
uint64_t list32_words(uint64_t n) { return add(n, 1) / 2; }  // Int32, UInt32, Float32
uint64_t struct_list_words(uint64_t n, uint64_t each) { return add(1, mul(n, each)); }

uint64_t step_id(const DecodeLimits& l) { return add(kStruct, text_words(l.max_name_bytes)); }
uint64_t token_list(const DecodeLimits& l) { return list32_words(l.max_sequence); }
uint64_t utterance(const DecodeLimits& l) { return add(add(kStruct, text_words(l.max_text_bytes)), token_list(l)); }
uint64_t rollout(const DecodeLimits& l) { return add(2 * kStruct, mul(3, token_list(l))); }

}  // namespace

std::string_view kind_name(MessageKind kind) {
  static constexpr std::string_view names[kMessageKinds] = {
      "TensorRef",         "ActorError", "TokenBatch", "TrainStep", "TrainStepResult", "CheckpointManifest",
      "GenerationRequest", "Rollout",    "Comparison", "Rating",    "Correction",      "ReplayRecord"};
  return names[static_cast<size_t>(kind)];
}

uint64_t traversal_limit_words(MessageKind kind, const DecodeLimits& l) {
  switch (kind) {
    case MessageKind::TensorRef:
      return add(add(kStruct, mul(2, text_words(l.max_name_bytes))), add(l.max_dims, data_words(l.max_inline_bytes)));
    case MessageKind::ActorError:
      return add(add(kStruct, text_words(l.max_text_bytes)), add(text_words(l.max_name_bytes), step_id(l)));
    case MessageKind::TokenBatch:
      return add(add(kStruct, step_id(l)), mul(2, list32_words(l.max_batch_tokens)));
    case MessageKind::TrainStep:
      // The micro-batches share max_batch_tokens; each brings its own struct and step id.
      return add(add(add(kStruct, step_id(l)), struct_list_words(l.max_micro_batches, add(kStruct, step_id(l)))),
                 add(mul(2, list32_words(l.max_batch_tokens)), mul(2, l.max_micro_batches)));  // odd lengths round up
    case MessageKind::TrainStepResult:
      return add(add(kStruct, step_id(l)), struct_list_words(l.max_layers, add(kStruct, list32_words(l.max_experts))));
    case MessageKind::CheckpointManifest:
      return add(add(kStruct, text_words(l.max_name_bytes)),
                 add(step_id(l), struct_list_words(l.max_files, add(kStruct, add(text_words(l.max_name_bytes), 4)))));
    case MessageKind::GenerationRequest:
      return add(3 * kStruct, mul(2, token_list(l)));
    case MessageKind::Rollout:
      return rollout(l);
    case MessageKind::Comparison:
      return add(add(3 * kStruct, mul(3, utterance(l))), text_words(l.max_name_bytes));
    case MessageKind::Rating:
      return add(add(2 * kStruct, mul(2, utterance(l))), text_words(l.max_name_bytes));
    case MessageKind::Correction:
      return add(add(2 * kStruct, mul(2, utterance(l))),
                 add(text_words(l.max_text_bytes), text_words(l.max_name_bytes)));
    case MessageKind::ReplayRecord:
      return add(add(kStruct, rollout(l)), add(mul(2, token_list(l)), step_id(l)));
  }
  return 0;
}

}  // namespace moerl::msg
