# Shared building blocks of moerl's control-plane messages (DESIGN.md, "Three planes"): ids of training
# steps and policy versions, references to tensors that the data plane moves, and errors.
#
# Evolution rules for every schema in schemas/: a field keeps its ordinal (@N) for ever; a removed field
# is renamed `obsoleteX` and kept, never deleted, and its ordinal is never reused; new fields take the
# next free ordinal; an enum value is never renumbered. Stored records (feedback.capnp) additionally carry
# a schemaVersion that readers check. Decoding and validation: runtime/messages/codec.hpp.

@0xb2191e5dd3a4248d;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("moerl::wire");

struct StepId {
  # Identifies one optimizer step of one run, so that a step replayed after a restart is recognised
  # and applied at most once (DESIGN.md, "Actors").

  run @0 :Text;
  # Name of the run (the recipe's run name), UTF-8.

  step @1 :UInt64;
  # Optimizer step counter within the run, starting at 1 for the first update.
}

struct PolicyVersion {
  # Which weights of the policy produced (or should produce) something.

  version @0 :UInt64;
  # Monotonic weight-version number, incremented each time new weights are published to rollout.

  step @1 :UInt64;
  # The optimizer step whose update produced these weights (0: the initial weights).
}

enum DType {
  # Element type of a tensor; the safetensors dtypes of runtime/tensor.hpp, in the same order.
  f32 @0;     # IEEE binary32
  bf16 @1;    # bfloat16
  f16 @2;     # IEEE binary16
  f8E4m3 @3;  # FP8 E4M3 (OCP, "fn": no infinities)
  i64 @4;     # signed 64-bit integer
  i32 @5;     # signed 32-bit integer
  u8 @6;      # unsigned byte
}

enum DeviceKind {
  # Kind of memory holding a tensor.
  cpu @0;   # host memory
  cuda @1;  # GPU memory
}

enum Transport {
  # How the bytes of a referenced tensor travel.
  inline @0;  # the bytes ride inside the message (TensorRef.inlineData); small tensors on one machine
  local @1;   # a buffer inside the same process, handed over by name
  nccl @2;    # NCCL between GPUs
  gloo @3;    # Gloo over TCP between CPU processes
}

enum Collective {
  # The operation that moves a referenced tensor on the data plane.
  none @0;           # no collective: the tensor is read where it lives (inline or local)
  send @1;           # point-to-point send/recv (pipeline-stage activations and gradients)
  broadcast @2;      # one to all (new weights to rollout)
  allReduce @3;      # sum over the group (data-parallel gradients)
  allGather @4;      # concatenation over the group
  reduceScatter @5;  # sum, each rank keeping its shard
  allToAll @6;       # exchange (tokens to and from expert shards)
}

struct TensorRef {
  # Names a tensor on the data plane: enough to allocate the receiving buffer and to post the matching
  # collective. Tensors never travel through mailboxes at scale; only small ones ride inline.

  name @0 :Text;
  # Tensor name, unique within the step (e.g. "model.layers.3.mlp.experts.7.gate_proj.weight" or
  # "stage2/activations").

  dtype @1 :DType;
  # Element type.

  shape @2 :List(Int64);
  # Dimensions, outermost first (row-major); each >= 0. Empty list: a scalar.

  device @3 :DeviceKind;
  # Kind of memory the tensor lives in on the sending side.

  deviceIndex @4 :UInt32;
  # Index of the GPU within its host (0 for CPU tensors).

  rank @5 :UInt32;
  # Rank, within `group`, of the process holding the tensor (the root of a broadcast, the sender of a send).

  transport @6 :Transport;
  # How the bytes travel.

  collective @7 :Collective;
  # Which collective moves them (none for inline and local tensors).

  group @8 :Text;
  # Name of the process group (communicator) the collective runs in; empty for inline and local.

  byteSize @9 :UInt64;
  # Size of the tensor's data in bytes: product(shape) * bytes per element of dtype.

  inlineData @10 :Data;
  # The tensor's bytes, little-endian row-major, when transport = inline (exactly byteSize bytes);
  # empty otherwise.
}

enum ErrorCode {
  # Class of an ActorError, for the receiver's retry decision.
  invalidRequest @0;  # the request was malformed or violated a limit; retrying the same request fails again
  notFound @1;        # a named object (checkpoint, tensor, record) does not exist
  unavailable @2;     # the actor or a resource is temporarily unavailable; retry later
  internal @3;        # a bug or an unexpected failure inside the actor
  staleVersion @4;    # the request names a policy version or step older than the actor's state
}

struct ActorError {
  # A failure reported by one actor to another, in place of the reply.

  code @0 :ErrorCode;
  # Class of the failure.

  message @1 :Text;
  # One line for people: what failed, naming the request, field or file, and what was expected.

  actor @2 :Text;
  # Role and name of the reporting actor (e.g. "rollout/0").

  step @3 :StepId;
  # The step the failed request belonged to, when it belonged to one.
}
