# Generation: requests from the driver to rollout actors, and the rollouts they return
# (DESIGN.md, "One RLHF step").
#
# Ordinals (@N) are never reused or renumbered; see the evolution rules in common.capnp.

@0x82e1301bb3ab1767;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("moerl::wire");

using Common = import "common.capnp";

struct SamplingParams {
  # How to pick each next token.

  temperature @0 :Float32;
  # Softmax temperature, finite and >= 0; 0 means greedy (argmax).

  topP @1 :Float32;
  # Nucleus sampling: smallest set of tokens whose probability reaches topP, in (0, 1]; 1 = off.

  topK @2 :UInt32;
  # Sample among the topK most likely tokens; 0 = off.

  maxNewTokens @3 :UInt32;
  # Upper bound on generated tokens per response, >= 1.

  stopIds @4 :List(Int32);
  # Generation stops after emitting any of these token ids (e.g. eos), each in [0, vocab).

  seed @5 :UInt64;
  # Seed of the sampler, so a replayed request generates the same responses.
}

struct GenerationRequest {
  # Command to a rollout actor: generate `samples` responses to one prompt.

  requestId @0 :UInt64;
  # Unique per request within a run; rollouts echo it (at-least-once delivery: duplicates are dropped).

  promptIds @1 :List(Int32);
  # Prompt token ids, at least one, each in [0, vocab).

  sampling @2 :SamplingParams;
  # Sampling settings.

  policyVersion @3 :Common.PolicyVersion;
  # Weights to generate with; a rollout actor holding older weights waits or answers staleVersion.

  samples @4 :UInt32;
  # Number of responses to generate (the group size G of GRPO), >= 1.
}

enum FinishReason {
  # Why generation of a response ended.
  stop @0;     # a stop id was emitted (it is the last response id)
  length @1;   # maxNewTokens was reached
  aborted @2;  # cancelled (shutdown, new weights); the response is incomplete
}

struct Rollout {
  # One generated response with the log-probabilities the sampler saw.

  requestId @0 :UInt64;
  # The GenerationRequest this answers.

  sampleIndex @1 :UInt32;
  # Which of the request's `samples` responses this is, in [0, samples).

  promptIds @2 :List(Int32);
  # The prompt token ids, as in the request.

  responseIds @3 :List(Int32);
  # Generated token ids, each in [0, vocab).

  logProbs @4 :List(Float32);
  # Natural-log probability of each response token under the generating policy, one per response id,
  # finite and <= 0.

  policyVersion @5 :Common.PolicyVersion;
  # Weights that generated the response.

  finishReason @6 :FinishReason;
  # Why generation ended.
}
