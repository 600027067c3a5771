// The rollout actor takes in-process weights zero-copy: after a weights message carrying the trainer's model it
// generates with that very object (an update to it shows in the next rollout without another message), stamped
// with the version sent; a folder afterwards replaces it.
#include <gtest/gtest.h>

#include "actors/roles/rollout.hpp"
#include "runtime/rl/generate.hpp"
#include "tests/actors/support.hpp"

namespace moerl::actors {
namespace {

using namespace moerl::actors::testing;

TEST(RolloutWeights, GeneratesWithTheTrainersModelWithoutCopyingIt) {
  const fs::path dir = fresh_dir("rollout_weights");
  const RemoveAtExit cleanup{dir};
  const fs::path model_dir = write_model(dir);
  caf::actor_system system{test_config()};
  caf::scoped_actor self{system};
  auto rollout = spawn_rollout(system, model_dir, Precision::FP32);
  auto trainer = std::shared_ptr<Model>(load_model_dir(model_dir).model.release());
  trainer->init_random(23);  // other weights than the folder's
  EXPECT_EQ(ask<uint64_t>(self, rollout, nullptr, weights_atom::value, trainer, uint64_t{3}, uint64_t{30}), 3u);

  msg::GenerationRequest req;
  req.request_id = 5;
  req.prompt_ids = {0, 5, 9};
  req.sampling.temperature = 0;
  req.sampling.max_new_tokens = 8;
  req.policy_version = msg::PolicyVersion{3, 30};
  auto greedy = [&](Model& m) {
    const std::vector<std::vector<int32_t>> p{req.prompt_ids};
    const std::vector<uint64_t> s{0};
    return rl::generate(m, p, req.sampling, s, Precision::FP32)[0].ids;
  };
  auto rollout_ids = [&] {
    const auto out = ask<std::vector<Envelope>>(self, rollout, nullptr, generate_atom::value, wrap(req));
    EXPECT_TRUE(out);
    const auto r = unwrap<msg::Rollout>(out->front());
    EXPECT_EQ(r.policy_version.version, 3u);
    return r.response_ids;
  };
  EXPECT_EQ(rollout_ids(), greedy(*trainer));
  // The trainer updates its model in place: the rollout sees it (same object, no copy).
  trainer->init_random(24);
  EXPECT_EQ(rollout_ids(), greedy(*trainer));
  // An older version is refused.
  caf::error err;
  EXPECT_FALSE(ask<uint64_t>(self, rollout, &err, weights_atom::value, trainer, uint64_t{2}, uint64_t{20}));
}

}  // namespace
}  // namespace moerl::actors
