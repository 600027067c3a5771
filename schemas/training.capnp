# Training-plane commands and results between the driver, data loaders and stage trainers
# (DESIGN.md, "Actors"): token batches, one optimizer step and what it reported, checkpoint manifests.
#
# Ordinals (@N) are never reused or renumbered; see the evolution rules in common.capnp.

@0xab819f4920b7bb60;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("moerl::wire");

using Common = import "common.capnp";

struct TokenBatch {
  # Token ids and next-token labels of one (micro-)batch, both [batch, seq] row-major: what
  # Model::forward takes.

  step @0 :Common.StepId;
  # The optimizer step this batch is for.

  batch @1 :UInt32;
  # Number of sequences (rows), >= 1.

  seq @2 :UInt32;
  # Tokens per sequence (columns), >= 1.

  ids @3 :List(Int32);
  # Input token ids, batch * seq entries, each in [0, vocab).

  labels @4 :List(Int32);
  # Next-token labels, batch * seq entries, each in [0, vocab) or -100 (no loss: prompt tokens, padding).
}

struct TrainStep {
  # Command from the driver to a trainer: run forward, backward and one optimizer update on `batches`
  # (gradients accumulated over them). A trainer that has already applied `step` replies with its
  # recorded result and does not apply it again.

  step @0 :Common.StepId;
  # The step to apply; strictly increasing within a run.

  batches @1 :List(TokenBatch);
  # Micro-batches whose gradients are accumulated into this one update; at least one, each with `step`.

  learningRate @2 :Float64;
  # Learning rate for this update, from the recipe's schedule (finite, >= 0).
}

struct ExpertLoad {
  # Routing statistics of one MoE layer during a step (auxiliary-loss-free balancing moves each
  # expert's bias by +-gamma from these counts).

  layer @0 :UInt32;
  # Decoder-layer index of the MoE layer.

  tokensPerExpert @1 :List(UInt32);
  # Number of token-to-expert assignments each routed expert received, n_routed_experts entries.
}

struct TrainStepResult {
  # Reply of a trainer to TrainStep: what the step measured.

  step @0 :Common.StepId;
  # The step this result belongs to.

  loss @1 :Float64;
  # Main next-token cross-entropy, mean over counted tokens, nats (finite unless `skipped`).

  mtpLoss @2 :Float64;
  # Multi-token-prediction cross-entropy, nats (0 when MTP is off; finite unless `skipped`).

  balanceLoss @3 :Float64;
  # Sum over MoE layers of the sequence-wise balance loss (0 when off; finite unless `skipped`).

  gradNorm @4 :Float64;
  # Global L2 norm of the gradient before clipping (finite unless `skipped`).

  learningRate @5 :Float64;
  # Learning rate the update used (finite, >= 0).

  tokens @6 :UInt64;
  # Tokens with a label that entered the loss.

  skipped @7 :Bool;
  # True when the update was not applied because the loss or gradient was not finite.

  expertLoad @8 :List(ExpertLoad);
  # One entry per MoE layer, ascending layer, all with the same number of experts.
}

enum ChecksumKind {
  # Algorithm of FileEntry.checksum.
  sha256 @0;  # SHA-256, 32 bytes
  crc32c @1;  # CRC-32C (Castagnoli), 4 bytes, big-endian
}

struct FileEntry {
  # One file of a checkpoint folder.

  path @0 :Text;
  # Path relative to the checkpoint folder ("model.safetensors"); no "..", not absolute.

  bytes @1 :UInt64;
  # File size in bytes.

  checksumKind @2 :ChecksumKind;
  # Algorithm of `checksum`.

  checksum @3 :Data;
  # Digest of the file's bytes: 32 bytes for sha256, 4 for crc32c.
}

struct CheckpointManifest {
  # A written checkpoint (runtime/train/checkpoint.hpp layout): the driver records it and restarts a
  # failed actor from the newest one.

  folder @0 :Text;
  # Absolute or run-relative path of the checkpoint folder.

  step @1 :Common.StepId;
  # The last optimizer step included in the checkpoint.

  files @2 :List(FileEntry);
  # Every file of the folder, each path once.
}
