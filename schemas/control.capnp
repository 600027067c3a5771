# Control messages between the driver and the actor roles that the other schemas do not cover
# (actors/roles/*.hpp declare who sends which): a data loader's position and what it serves, validation
# and checkpoint commands to a stage trainer, and a reward model's score.
#
# Ordinals (@N) are never reused or renumbered; see the evolution rules in common.capnp.
# Decoding and validation: runtime/messages/control.hpp.

@0xc6f41937e51ded32;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("moerl::wire");

using Common = import "common.capnp";

struct LoaderPosition {
  # Where a data loader stands in its stage's sequence of batches (runtime/data/loader.hpp LoaderState):
  # a loader restored to it serves exactly the batches the original would have served next.

  seed @0 :UInt64;
  # Seed of the stage's batch order.

  epoch @1 :Int64;
  # Epochs completed, >= 0.

  cursor @2 :Int64;
  # Batches already served in the current epoch, >= 0.

  step @3 :Common.StepId;
  # The last step a batch was served for (step 0: none yet); the next request must be for step + 1
  # (or repeat step, which serves the same batch again).
}

struct DatasetInfo {
  # Reply of a data loader to `describe`: the tokenizer it encodes with, which fixes the model's vocabulary.

  tokenizerFile @0 :Text;
  # Path of the SentencePiece model the loader uses (tokenizer.model in the run folder), non-empty.

  vocabSize @1 :UInt32;
  # Number of pieces, >= 1: the model's vocab_size.

  bosId @2 :Int32;
  # Beginning-of-sequence id, in [0, vocabSize).

  eosId @3 :Int32;
  # End-of-sequence id, in [0, vocabSize).

  padId @4 :Int32;
  # Padding id of SFT batches, in [0, vocabSize).

  trainTokens @5 :UInt64;
  # Tokens of the training split (all documents, bos and eos included).

  validationTokens @6 :UInt64;
  # Tokens of the validation split.
}

struct StageData {
  # Reply of a data loader to `open`: what a stage needs besides its training batches.

  stage @0 :UInt32;
  # Index of the stage in the recipe's list of stages.

  position @1 :LoaderPosition;
  # The loader's position after opening: the start of the stage (step 0).

  validation @2 :List(Data);
  # The stage's fixed validation batches, each one encoded TokenBatch message (runtime/messages/codec.hpp),
  # so that each is validated by the TokenBatch rules; empty when the split has no validation window.

  hasBigram @3 :Bool;
  # True when bigramValidationLoss was computed (pretraining stages).

  bigramValidationLoss @4 :Float64;
  # Cross-entropy of the add-one bigram baseline on `validation`, nats (finite, >= 0, when hasBigram).
}

struct EvalRequest {
  # Command from the driver to a stage trainer: the mean next-token cross-entropy of the current weights
  # over `batches` (forward only, no gradient, no update).

  step @0 :Common.StepId;
  # The step after which the evaluation runs (for the record; evaluation changes nothing).

  batches @1 :List(Data);
  # The batches, each one encoded TokenBatch message; at least one.
}

struct EvalResult {
  # Reply of a stage trainer to EvalRequest.

  step @0 :Common.StepId;
  # As in the request.

  loss @1 :Float64;
  # Main next-token cross-entropy, mean over every labelled token of all batches, nats (finite, >= 0).

  tokens @2 :UInt64;
  # Labelled tokens the mean is over.
}

struct CheckpointRequest {
  # Command from the driver to a stage trainer: write a training checkpoint (runtime/train/checkpoint.hpp
  # layout) of the current weights and optimizer into `folder`, atomically. The reply is the
  # CheckpointManifest of the written folder.

  folder @0 :Text;
  # Checkpoint folder (the stage's folder in the run folder), non-empty.

  step @1 :Common.StepId;
  # The last step the checkpoint includes: the trainer refuses a step it has not applied.

  trainerState @2 :Text;
  # A JSON object written as trainer_state.json (stage, step, loader position, metrics so far).
}

struct RewardScore {
  # Reply of a reward model to a Rollout: the sequence-level score of its response.

  requestId @0 :UInt64;
  # The rollout's GenerationRequest.

  sampleIndex @1 :UInt32;
  # The rollout's sampleIndex.

  score @2 :Float32;
  # The reward, finite; higher is better (the reward model's units: mean log-likelihood per response
  # token for a language-model scorer).

  scorer @3 :Text;
  # Role and name of the scoring actor (e.g. "reward_model/0").
}
