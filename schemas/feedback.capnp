# Stored records: human feedback from the feedback page and the replay buffer's entries, kept in RocksDB
# (DESIGN.md, "Three planes", storage). Records outlive the code that wrote them: each carries
# `schemaVersion` (currentSchemaVersion when written) and readers refuse versions they do not know.
#
# Ordinals (@N) are never reused or renumbered; see the evolution rules in common.capnp. Changing what a
# field means requires a new field (and usually a new schemaVersion), never a new meaning for an old one.

@0x8e9f8c48177c4fc3;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("moerl::wire");

using Common = import "common.capnp";
using Rollout = import "rollout.capnp";

const currentSchemaVersion :UInt32 = 1;
# schemaVersion written by this code. Version 1: the records below as first defined.

struct Utterance {
  # A prompt or response as a person saw it.

  text @0 :Text;
  # The text shown on the feedback page, UTF-8.

  ids @1 :List(Int32);
  # Its token ids under the policy's tokenizer, each in [0, vocab); empty when the text was typed by a
  # person and not yet tokenized.
}

enum Choice {
  # Outcome of a pairwise comparison.
  firstChosen @0;   # the first response is preferred (chosen), the second rejected
  secondChosen @1;  # the second response is preferred, the first rejected
  tie @2;           # neither is preferred
}

struct Comparison {
  # A person compared two responses to one prompt (reward-model training data).

  schemaVersion @0 :UInt32;
  # Record layout version; see currentSchemaVersion.

  prompt @1 :Utterance;
  # The prompt.

  first @2 :Utterance;
  # The response shown first (left).

  second @3 :Utterance;
  # The response shown second (right).

  choice @4 :Choice;
  # Which response the person preferred.

  annotator @5 :Text;
  # Pseudonymous id of the person.

  timestampNs @6 :Int64;
  # When the choice was made, nanoseconds since the Unix epoch (UTC), > 0.

  firstPolicy @7 :Common.PolicyVersion;
  # Policy that generated `first`.

  secondPolicy @8 :Common.PolicyVersion;
  # Policy that generated `second`.
}

struct Rating {
  # A person scored one response on a numeric scale.

  schemaVersion @0 :UInt32;
  # Record layout version; see currentSchemaVersion.

  prompt @1 :Utterance;
  # The prompt.

  response @2 :Utterance;
  # The rated response.

  score @3 :Float32;
  # The score given, in [scaleMin, scaleMax].

  scaleMin @4 :Float32;
  # Lowest score of the scale offered (e.g. 1), finite.

  scaleMax @5 :Float32;
  # Highest score of the scale offered (e.g. 7), finite, > scaleMin.

  annotator @6 :Text;
  # Pseudonymous id of the person.

  timestampNs @7 :Int64;
  # When the rating was given, nanoseconds since the Unix epoch (UTC), > 0.

  policy @8 :Common.PolicyVersion;
  # Policy that generated the response.
}

struct Correction {
  # A person rewrote a response into what it should have been (supervised fine-tuning data).

  schemaVersion @0 :UInt32;
  # Record layout version; see currentSchemaVersion.

  prompt @1 :Utterance;
  # The prompt.

  original @2 :Utterance;
  # The response as generated.

  corrected @3 :Text;
  # The person's rewrite, UTF-8, non-empty.

  annotator @4 :Text;
  # Pseudonymous id of the person.

  timestampNs @5 :Int64;
  # When the correction was submitted, nanoseconds since the Unix epoch (UTC), > 0.

  policy @6 :Common.PolicyVersion;
  # Policy that generated the original response.
}

struct ReplayRecord {
  # An entry of the replay buffer: a rollout with its rewards and advantages, ready for a policy update.

  schemaVersion @0 :UInt32;
  # Record layout version; see currentSchemaVersion.

  rollout @1 :Rollout.Rollout;
  # The generated response and its log-probabilities.

  score @2 :Float32;
  # Sequence-level reward of the whole response (reward model and rule-based rewards combined), finite.

  rewards @3 :List(Float32);
  # Per-token rewards (e.g. KL penalty, PPO), one per response token, finite; empty when only `score`
  # is used (GRPO).

  advantages @4 :List(Float32);
  # Per-token advantages, one per response token, finite (GRPO: the group-normalized score repeated).

  groupId @5 :UInt64;
  # Identifies the group of responses to one prompt whose scores were normalized together (GRPO).

  step @6 :Common.StepId;
  # The optimizer step that scored this rollout (its policy's step plus one when on-policy).
}

struct PairToJudge {
  # Two responses to one prompt waiting for people to compare or rate them on the feedback page. Queued by
  # the rollout side (the feedback collector actor, or an admin through the HTTP API); a Comparison or
  # Rating submitted for it copies its prompt, responses and policies.

  schemaVersion @0 :UInt32;
  # Record layout version; see currentSchemaVersion.

  pairId @1 :UInt64;
  # Unique per store, > 0; what the page sends back with the judgement.

  prompt @2 :Utterance;
  # The prompt.

  first @3 :Utterance;
  # The response shown first (left).

  second @4 :Utterance;
  # The response shown second (right).

  firstPolicy @5 :Common.PolicyVersion;
  # Policy that generated `first`.

  secondPolicy @6 :Common.PolicyVersion;
  # Policy that generated `second`.

  createdNs @7 :Int64;
  # When the pair was queued, nanoseconds since the Unix epoch (UTC), > 0.
}
