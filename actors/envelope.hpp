// What actors exchange: Cap'n Proto messages (schemas/*.capnp) as bytes beside the name of their schema
// struct, operation atoms, and failures as caf::error carrying an ActorError message. A role decodes what
// it receives with the validating codec (runtime/messages/): a malformed message is answered with an
// ActorError naming the kind and field, never a crash.
//
// Scalars that need no validation beyond their type (a stage index, a step number, a folder) travel as
// plain CAF values beside the atom; anything with structure travels as an Envelope.
#pragma once
#include <caf/all.hpp>

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "runtime/error.hpp"
#include "runtime/messages/codec.hpp"
#include "runtime/messages/control.hpp"
#include "runtime/messages/types.hpp"

namespace moerl::actors {

// One Cap'n Proto message: `kind` is its schema struct's name ("TrainStep"), `bytes` one unpacked message
// (msg::encode). CAF copies the byte vector with one memcpy when it serializes.
struct Envelope {
  std::string kind;
  std::vector<uint8_t> bytes;
};
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, Envelope& x) {
  return f(caf::meta::type_name("moerl.Envelope"), x.kind, x.bytes);
}

// Where a store keeps a record (store::Key): the time of its key and its sequence number in the store.
struct RecordKey {
  uint64_t time_ns = 0;
  uint64_t seq = 0;
};
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, RecordKey& x) {
  return f(caf::meta::type_name("moerl.RecordKey"), x.time_ns, x.seq);
}

// The schema name and decoder of each message type an Envelope may carry.
template <class T>
struct MessageTraits;
#define MOERL_MESSAGE_TRAITS(Type, name, decoder)                                                  \
  template <>                                                                                     \
  struct MessageTraits<msg::Type> {                                                               \
    static constexpr const char* kind = name;                                                     \
    static msg::Type decode(std::span<const uint8_t> b, const msg::DecodeLimits& l) { return msg::decoder(b, l); } \
  };
MOERL_MESSAGE_TRAITS(TensorRef, "TensorRef", decode_tensor_ref)
MOERL_MESSAGE_TRAITS(ActorError, "ActorError", decode_actor_error)
MOERL_MESSAGE_TRAITS(TokenBatch, "TokenBatch", decode_token_batch)
MOERL_MESSAGE_TRAITS(TrainStep, "TrainStep", decode_train_step)
MOERL_MESSAGE_TRAITS(TrainStepResult, "TrainStepResult", decode_train_step_result)
MOERL_MESSAGE_TRAITS(CheckpointManifest, "CheckpointManifest", decode_checkpoint_manifest)
MOERL_MESSAGE_TRAITS(GenerationRequest, "GenerationRequest", decode_generation_request)
MOERL_MESSAGE_TRAITS(Rollout, "Rollout", decode_rollout)
MOERL_MESSAGE_TRAITS(Comparison, "Comparison", decode_comparison)
MOERL_MESSAGE_TRAITS(Rating, "Rating", decode_rating)
MOERL_MESSAGE_TRAITS(Correction, "Correction", decode_correction)
MOERL_MESSAGE_TRAITS(ReplayRecord, "ReplayRecord", decode_replay_record)
MOERL_MESSAGE_TRAITS(LoaderPosition, msg::kLoaderPositionKind, decode_loader_position)
MOERL_MESSAGE_TRAITS(DatasetInfo, msg::kDatasetInfoKind, decode_dataset_info)
MOERL_MESSAGE_TRAITS(StageData, msg::kStageDataKind, decode_stage_data)
MOERL_MESSAGE_TRAITS(EvalRequest, msg::kEvalRequestKind, decode_eval_request)
MOERL_MESSAGE_TRAITS(EvalResult, msg::kEvalResultKind, decode_eval_result)
MOERL_MESSAGE_TRAITS(CheckpointRequest, msg::kCheckpointRequestKind, decode_checkpoint_request)
MOERL_MESSAGE_TRAITS(RewardScore, msg::kRewardScoreKind, decode_reward_score)
#undef MOERL_MESSAGE_TRAITS

template <class T>
Envelope wrap(const T& x) {
  return Envelope{MessageTraits<T>::kind, msg::encode(x)};
}

// The message inside `e`; throws moerl::Error naming the expected kind when `e` carries another, and the
// codec's error (kind and field) when the bytes are malformed.
template <class T>
T unwrap(const Envelope& e, const msg::DecodeLimits& limits = {}) {
  if (e.kind != MessageTraits<T>::kind)
    throw Error(std::string("expected a ") + MessageTraits<T>::kind + " message, got \"" + e.kind.substr(0, 64) + "\"");
  return MessageTraits<T>::decode(e.bytes, limits);
}

// Operations. Each role's header lists the ones it answers, with their arguments and replies.
using describe_atom = caf::atom_constant<caf::atom("describe")>;
using open_atom = caf::atom_constant<caf::atom("open")>;
using batch_atom = caf::atom_constant<caf::atom("batch")>;
using position_atom = caf::atom_constant<caf::atom("position")>;
using restore_atom = caf::atom_constant<caf::atom("restore")>;
using begin_atom = caf::atom_constant<caf::atom("begin")>;
using train_atom = caf::atom_constant<caf::atom("train")>;
using evaluate_atom = caf::atom_constant<caf::atom("evaluate")>;
using checkpoint_atom = caf::atom_constant<caf::atom("checkpoint")>;
using run_atom = caf::atom_constant<caf::atom("run")>;
using lookup_atom = caf::atom_constant<caf::atom("lookup")>;
using forward_atom = caf::atom_constant<caf::atom("forward")>;
using generate_atom = caf::atom_constant<caf::atom("generate")>;
using weights_atom = caf::atom_constant<caf::atom("weights")>;
using score_atom = caf::atom_constant<caf::atom("score")>;
using logprobs_atom = caf::atom_constant<caf::atom("logprobs")>;
using submit_atom = caf::atom_constant<caf::atom("submit")>;
using list_atom = caf::atom_constant<caf::atom("list")>;
using put_atom = caf::atom_constant<caf::atom("put")>;
using sample_atom = caf::atom_constant<caf::atom("sample")>;
using size_atom = caf::atom_constant<caf::atom("size")>;

// Failures. An actor answers a request it cannot serve with actor_error(...): a caf::error of category
// "moerl" whose code is 1 + msg::ErrorCode and whose context is an Envelope holding the ActorError, so the
// reason survives a trip between processes. Errors CAF raises itself (a dead actor, a timeout) keep theirs.
caf::error actor_error(msg::ErrorCode code, std::string message, std::string actor, msg::StepId step = {});
// The ActorError inside `e`, when it is one of ours.
std::optional<msg::ActorError> actor_error_of(const caf::error& e);
// One line for people: "stage_trainer/0: TrainStep.learningRate: ..." for ours, CAF's rendering otherwise.
std::string describe(const caf::error& e);

// A request refused with a specific code (e.g. StaleVersion for a step older than the actor's state).
struct Refusal : Error {
  Refusal(msg::ErrorCode c, const std::string& message) : Error(message), code(c) {}
  msg::ErrorCode code;
};

// The value type of a handler's answer: T for T and for caf::result<T> (a handler that may answer later
// through a promise).
template <class T>
struct answer_of {
  using type = T;
};
template <class T>
struct answer_of<caf::result<T>> {
  using type = T;
};

// Runs `f` (a handler's body) and turns exceptions into actor errors: Refusal with its code, moerl::Error
// (bad input: a malformed message, a refused request, a bad file) as InvalidRequest, anything else as Internal.
template <class F>
auto guarded(const std::string& actor, F&& f) -> caf::result<typename answer_of<decltype(f())>::type> {
  try {
    return f();
  } catch (const Refusal& e) {
    return actor_error(e.code, e.what(), actor);
  } catch (const Error& e) {
    return actor_error(msg::ErrorCode::InvalidRequest, e.what(), actor);
  } catch (const std::exception& e) {
    return actor_error(msg::ErrorCode::Internal, e.what(), actor);
  }
}

// Registers the message types of every role (Envelope and lists of them), so that they cross process
// boundaries. Call before constructing the actor_system (both ends of a connection).
void add_message_types(caf::actor_system_config& config);

}  // namespace moerl::actors
