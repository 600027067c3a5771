// The preferences stage's pairs through the actors (runtime/train/pair_source.hpp's PairSource):
//   rollout actors       GenerationRequest (one per prompt, 2 samples, the stage's sampling) -> 2 Rollouts;
//                        the recipe's thread count of them, one thread each (a request decodes 2 sequences:
//                        too few for OpenMP inside it to pay), the first with the caller's policy itself
//                        (zero-copy), the others with exact copies; each spawned and supervised as in the rlhf
//                        stage (rlhf_actors.hpp: respawned when it dies, the request sent again, at most
//                        max_restarts times). Requests are seeded: the pairs do not depend on the count
//   replay buffer actor  each Rollout as a ReplayRecord (advantages 0: not yet scored), durable, in the stage's
//                        folder (<stage>/replay), kept after the stage
//   feedback collector   the records read back from the buffer by policy version, paired by request, queued as
//                        PairToJudge (pair id = request id = prompt index + 1) in the stage's feedback store,
//                        every one durable before sample_and_queue returns
// The endpoint and the annotator then judge them as in the in-process path (run_preferences), except that the
// endpoint's judgements go through a feedback collector actor on the stage's store (judgement_sink).
//
// Sampling streams are the rollout actor's (rl::rollout_stream: request id * 1025 + sample), not the in-process
// path's (2i, 2i + 1):
// the same recipe samples other responses through the actors than without them.
#pragma once
#include <memory>

#include "actors/roles/rlhf_actors.hpp"
#include "runtime/train/pair_source.hpp"

namespace moerl::actors {

class ActorPairSource : public PairSource {
 public:
  // In `system` (add_message_types applied); `options` supervise the rollout actor (max_restarts,
  // reply_timeout; before_request lets tests kill it).
  explicit ActorPairSource(caf::actor_system& system, RlhfActorOptions options = {});
  // In an actor system of its own.
  ActorPairSource();
  ~ActorPairSource() override;

  std::vector<std::vector<int32_t>> sample_and_queue(const PairJob& job) override;
  // A collector "feedback/<stage>/judgements" on job.feedback behind an ActorRecordSink (feedback_sink.hpp).
  std::unique_ptr<feedback::RecordSink> judgement_sink(const PairJob& job) override;
  std::string name() const override { return "actors"; }

 private:
  std::unique_ptr<caf::actor_system_config> own_config_;
  std::unique_ptr<caf::actor_system> own_system_;
  caf::actor_system& system_;
  RlhfActorOptions options_;
};

}  // namespace moerl::actors
